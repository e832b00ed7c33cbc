//! Issue 16, scenario 2: applied rows fire user triggers. Apply writes as a replica
//! (`session_replication_role = replica`), as PostgreSQL's own subscriptions, pglogical, Spock and
//! PGD do, so a user's ordinary trigger fires once, on the node where the application wrote, and
//! its effects replicate like any other write: an `updated_at = clock_timestamp()` BEFORE trigger
//! gives every node the origin's value, and an AFTER trigger that writes an audit row into a
//! replicated table writes it once, not once more on every node that applies the change.
//! pgferry's own triggers still fire on applied rows (`ENABLE ALWAYS`), also on a node whose
//! triggers an earlier pgferry left `ENABLE`d for origin sessions only: apply upgrades them at
//! start (checked here by an applied delete leaving its tombstone).

use std::time::Duration;

use anyhow::Result;
use pgferry_integration_tests::{wait_until, Cluster};

/// `item` is applied in groups, `tagged` (a secondary unique key) one change at a time; both
/// have the same two user triggers on every node.
const SETUP: &str = "
CREATE TABLE item (id int PRIMARY KEY, v text, updated_at timestamptz);
CREATE TABLE tagged (id int PRIMARY KEY, code text UNIQUE, v text, updated_at timestamptz);
CREATE TABLE audit (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), tbl text NOT NULL, row_id int NOT NULL,
                    op text NOT NULL, v text, at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := clock_timestamp();
    RETURN NEW;
END $$;
CREATE FUNCTION audit_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        INSERT INTO audit (tbl, row_id, op, v) VALUES (TG_TABLE_NAME, OLD.id, TG_OP, OLD.v);
    ELSE
        INSERT INTO audit (tbl, row_id, op, v) VALUES (TG_TABLE_NAME, NEW.id, TG_OP, NEW.v);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER item_touch BEFORE INSERT OR UPDATE ON item FOR EACH ROW EXECUTE FUNCTION touch();
CREATE TRIGGER item_audit AFTER INSERT OR UPDATE OR DELETE ON item FOR EACH ROW EXECUTE FUNCTION audit_row();
CREATE TRIGGER tagged_touch BEFORE INSERT OR UPDATE ON tagged FOR EACH ROW EXECUTE FUNCTION touch();
CREATE TRIGGER tagged_audit AFTER INSERT OR UPDATE OR DELETE ON tagged FOR EACH ROW EXECUTE FUNCTION audit_row();";

const TABLES: [&str; 3] = ["item", "tagged", "audit"];

/// pgferry's triggers and event triggers on a node that are not `ENABLE ALWAYS`.
const NOT_ALWAYS: &str = "
SELECT coalesce(string_agg(name, ', '), '') FROM (
    SELECT tgrelid::regclass || '.' || tgname AS name FROM pg_trigger
    WHERE tgname IN ('pgferry_tombstone', 'pgferry_stamped_xact') AND tgenabled <> 'A'
    UNION ALL
    SELECT evtname FROM pg_event_trigger WHERE evtname LIKE 'pgferry%' AND evtenabled <> 'A') t";

/// Waits until every table is identical on all nodes and holds `audit_rows` audit rows.
async fn converged(cluster: &Cluster, audit_rows: i64) -> Result<()> {
    for t in TABLES {
        cluster.wait_converged(t, Duration::from_secs(90)).await?;
    }
    for i in 0..cluster.nodes.len() {
        let c = cluster.sql(i).await?;
        let n: i64 = c.query_one("SELECT count(*) FROM audit", &[]).await?.get(0);
        assert_eq!(
            n,
            audit_rows,
            "audit rows on node {}: each write is audited once, where it was made",
            i + 1
        );
        let untouched: i64 = c
            .query_one("SELECT (SELECT count(*) FROM item WHERE updated_at IS NULL) + (SELECT count(*) FROM tagged WHERE updated_at IS NULL)", &[])
            .await?
            .get(0);
        assert_eq!(
            untouched, 0,
            "every row carries the updated_at its origin's trigger set"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applied_rows_fire_user_triggers() -> Result<()> {
    let mut cluster = Cluster::create(
        "trig",
        &["r1", "r1", "r1"],
        SETUP,
        &["public.item", "public.tagged", "public.audit"],
    )
    .await?;
    cluster.replication_toml = "ddl = true".into();
    cluster.write_config()?;
    cluster.init()?;
    let n1 = cluster.sql(0).await?;
    let n2 = cluster.sql(1).await?;
    let always: String = n1.query_one(NOT_ALWAYS, &[]).await?.get(0);
    assert_eq!(always, "", "init makes pgferry's triggers ENABLE ALWAYS");

    // n2 as an earlier pgferry left it: its triggers enabled for origin sessions only (a local
    // change of pgferry's own, not replicated as DDL).
    n2.batch_execute(
        "SET pgferry.local_ddl = on;
         ALTER TABLE item ENABLE TRIGGER pgferry_tombstone;
         ALTER TABLE tagged ENABLE TRIGGER pgferry_tombstone;
         ALTER TABLE pgferry.row_stamps ENABLE TRIGGER pgferry_stamped_xact;
         ALTER EVENT TRIGGER pgferry_ddl ENABLE;
         ALTER EVENT TRIGGER pgferry_ddl_start ENABLE;
         ALTER EVENT TRIGGER pgferry_ddl_drop ENABLE;
         RESET pgferry.local_ddl;",
    )
    .await?;
    assert_ne!(n2.query_one(NOT_ALWAYS, &[]).await?.get::<_, String>(0), "");

    let services: Vec<_> = (0..3).map(|i| cluster.spawn("run", i)).collect::<Result<_, _>>()?;
    wait_until(
        "apply on n2 to make pgferry's triggers ENABLE ALWAYS",
        Duration::from_secs(60),
        || async { Ok(n2.query_one(NOT_ALWAYS, &[]).await?.get::<_, String>(0).is_empty()) },
    )
    .await?;

    // Writes on n1: 3 + 2 inserts, 2 updates, 1 delete, each audited once by n1's trigger.
    for sql in [
        "INSERT INTO item (id, v) VALUES (1, 'a'), (2, 'b'), (3, 'c')",
        "INSERT INTO tagged (id, code, v) VALUES (1, 'x', 'a'), (2, 'y', 'b')",
        "UPDATE item SET v = 'a2' WHERE id = 1",
        "UPDATE tagged SET v = 'b2' WHERE id = 2",
        "DELETE FROM item WHERE id = 3",
    ] {
        n1.batch_execute(sql).await?;
    }
    converged(&cluster, 8).await?;
    // The applied delete left its tombstone on n2 (the upgraded trigger fired as a replica).
    let tombstones: i64 = n2
        .query_one(
            "SELECT count(*) FROM pgferry.tombstones WHERE tbl = 'public.item' AND key = '[3]'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(tombstones, 1, "the tombstone trigger fires on applied deletes");

    // A local write on n2 still fires n2's own triggers, once, and replicates.
    n2.batch_execute("UPDATE item SET v = 'from n2' WHERE id = 2").await?;
    converged(&cluster, 9).await?;
    let (v, audited): (String, i64) = {
        let n3 = cluster.sql(2).await?;
        let r = n3
            .query_one(
                "SELECT (SELECT v FROM item WHERE id = 2), (SELECT count(*) FROM audit WHERE tbl = 'item' AND row_id = 2 AND v = 'from n2')",
                &[],
            )
            .await?;
        (r.get(0), r.get(1))
    };
    assert_eq!((v.as_str(), audited), ("from n2", 1));

    drop(services);
    cluster.cleanup().await?;
    Ok(())
}
