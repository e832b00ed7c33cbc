//! Conflicts built on real nodes, for every conflict type apply detects and every resolver:
//! concurrent writes to the same key on n1 and then n2 (so n2's commit is the later one) while
//! apply is stopped, then apply runs and each node settles what it receives. The test checks
//! the final row on both nodes and the conflict each node recorded in `pgferry.conflicts`, and
//! that each recorded conflict reached the `<cluster>.conflicts` topic.
//!
//! Scenarios (one table each; "later" = n2's write):
//! - `ie`: both insert key 1 → `insert_exists` on both nodes.
//! - `uod`: both update a replicated row → `update_origin_differs` on both.
//! - `dl`: n1 updates, n2 deletes later → n1 `delete_origin_differs`, n2 `update_deleted`.
//! - `ul`: n1 deletes, n2 updates later → n1 `update_deleted`, n2 `delete_origin_differs`.
//! - `um`: a row only n1 has is updated on n1 → n2 `update_missing`.
//! - `dm`: a row only n1 has is deleted on n1 → n2 `delete_missing`.
//! - `ue`: `v` is UNIQUE; n1 sets row 1's `v` to 'same', n2 later sets row 2's `v` to 'same'
//!   → `update_exists` on both (the losing row ends absent under last/first update wins).
//!
//! Under the two resolvers that weigh stamps (last and first update wins) every table must
//! also end identical on both nodes.

use std::time::Duration;

use std::collections::BTreeSet;

use pgferry_integration_tests::{read_topic, wait_until, Cluster};
use pgferry_schemas::conflict_report::ConflictReport;

const TABLES: [&str; 7] = ["ie", "uod", "dl", "ul", "um", "dm", "ue"];

fn setup() -> String {
    let mut sql: String = TABLES
        .iter()
        .map(|t| {
            let unique = if *t == "ue" { " UNIQUE" } else { "" };
            format!("CREATE TABLE {t} (id int PRIMARY KEY, v text NOT NULL{unique});")
        })
        .collect();
    sql += "CREATE TABLE marker (node text PRIMARY KEY);";
    sql
}

/// What one node ends with for one scenario: the row's value (None = absent) and the
/// (conflict type, resolution) it recorded.
type Outcome = (Option<&'static str>, Option<(&'static str, &'static str)>);

struct Expect {
    table: &'static str,
    n1: Outcome,
    n2: Outcome,
}

/// Builds every scenario under `resolver` and checks the outcomes.
async fn run(resolver: &str, expect: &[Expect]) -> anyhow::Result<()> {
    let mut tables: Vec<String> = TABLES.iter().map(|t| format!("public.{t}")).collect();
    tables.push("public.marker".into());
    let table_refs: Vec<&str> = tables.iter().map(String::as_str).collect();
    let mut cluster = Cluster::create(&format!("cf_{resolver}"), &["r1", "r1"], &setup(), &table_refs).await?;
    cluster.replication_toml = format!("resolver = \"{resolver}\"");
    cluster.write_config()?;
    // Rows only n1 has: written before init, so never captured.
    let n1 = cluster.sql(0).await?;
    let n2 = cluster.sql(1).await?;
    n1.batch_execute("INSERT INTO um VALUES (1, 'old'); INSERT INTO dm VALUES (1, 'old');").await?;
    cluster.init()?;
    let _captures = (cluster.spawn("capture", 0)?, cluster.spawn("capture", 1)?);
    let applies = (cluster.spawn("apply", 0)?, cluster.spawn("apply", 1)?);
    n1.batch_execute(
        "INSERT INTO uod VALUES (1, 'base'); INSERT INTO dl VALUES (1, 'base'); INSERT INTO ul VALUES (1, 'base');
         INSERT INTO ue VALUES (1, 'base1');",
    )
    .await?;
    // Each row of `ue` last written by the node that later updates it (no origin_differs).
    n2.batch_execute("INSERT INTO ue VALUES (2, 'base2')").await?;
    for t in ["uod", "dl", "ul", "ue"] {
        cluster.wait_converged(t, Duration::from_secs(60)).await?;
    }
    drop(applies);

    // Concurrent writes: n1's first, n2's later.
    n1.batch_execute(
        "INSERT INTO ie VALUES (1, 'n1');
         UPDATE uod SET v = 'n1';
         UPDATE dl SET v = 'n1';
         DELETE FROM ul;
         UPDATE um SET v = 'n1';
         DELETE FROM dm;
         UPDATE ue SET v = 'same' WHERE id = 1;
         INSERT INTO marker VALUES ('n1');",
    )
    .await?;
    n2.batch_execute(
        "INSERT INTO ie VALUES (1, 'n2');
         UPDATE uod SET v = 'n2';
         DELETE FROM dl;
         UPDATE ul SET v = 'n2';
         UPDATE ue SET v = 'same' WHERE id = 2;
         INSERT INTO marker VALUES ('n2');",
    )
    .await?;
    let _applies = (cluster.spawn("apply", 0)?, cluster.spawn("apply", 1)?);
    // Each node has the other's marker: everything before it has been applied (the writes
    // above are single transactions, applied in order).
    wait_until("both markers on both nodes", Duration::from_secs(60), || async {
        let a: i64 = n1.query_one("SELECT count(*) FROM marker", &[]).await?.get(0);
        let b: i64 = n2.query_one("SELECT count(*) FROM marker", &[]).await?.get(0);
        Ok(a == 2 && b == 2)
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", cluster.logs()))?;

    for e in expect {
        for (node, want) in [(&n1, &e.n1), (&n2, &e.n2)] {
            let value: Option<String> = node
                .query_opt(&format!("SELECT v FROM {} WHERE id = 1", e.table), &[])
                .await?
                .map(|r| r.get(0));
            let conflicts = node
                .query(
                    "SELECT conflict_type, resolution, resolver, remote_origin IS NOT NULL AND remote_commit_lsn IS NOT NULL
                     FROM pgferry.conflicts WHERE tbl = $1",
                    &[&format!("public.{}", e.table)],
                )
                .await?;
            let got: Vec<(String, String)> = conflicts.iter().map(|r| (r.get(0), r.get(1))).collect();
            let which = if std::ptr::eq(node, &n1) { "n1" } else { "n2" };
            assert_eq!(value.as_deref(), want.0, "{resolver}: table {} on {which}: row", e.table);
            let want_conflicts: Vec<(String, String)> = want.1.iter().map(|(t, r)| (t.to_string(), r.to_string())).collect();
            assert_eq!(got, want_conflicts, "{resolver}: table {} on {which}: conflicts", e.table);
            for r in &conflicts {
                assert_eq!(r.get::<_, String>(2), resolver);
                assert!(r.get::<_, bool>(3), "remote origin and LSN recorded");
            }
        }
    }
    if resolver == "last_update_wins" || resolver == "first_update_wins" {
        for t in TABLES {
            let (a, b) = (cluster.fingerprint(0, t).await?, cluster.fingerprint(1, t).await?);
            assert_eq!(a, b, "{resolver}: table {t} differs between the nodes");
        }
    }
    check_conflicts_topic(&cluster, &[&n1, &n2]).await?;
    drop(_applies);
    drop(_captures);
    cluster.cleanup().await
}

/// Every conflict each node recorded reaches `<cluster>.conflicts` as a `pgferry.ConflictReport`
/// with the same table, type, resolution and remote origin.
async fn check_conflicts_topic(cluster: &Cluster, nodes: &[&tokio_postgres::Client]) -> anyhow::Result<()> {
    type Report = (String, i64, String, String, String, String);
    let mut want: BTreeSet<Report> = BTreeSet::new();
    for (i, c) in nodes.iter().enumerate() {
        let rows = c
            .query("SELECT id, tbl, conflict_type, resolution, remote_origin FROM pgferry.conflicts", &[])
            .await?;
        for r in rows {
            want.insert((cluster.nodes[i].name.clone(), r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)));
        }
    }
    let schema = ConflictReport::schema()?;
    let topic = format!("{}.conflicts", cluster.name);
    wait_until("every recorded conflict in the conflicts topic", Duration::from_secs(60), || async {
        let mut got: BTreeSet<Report> = BTreeSet::new();
        for m in read_topic(&cluster.endpoints.kafka, &topic)? {
            let r = ConflictReport::decode(&schema, &m.value[5..])?;
            anyhow::ensure!(m.key == format!("{}/{}", r.node, r.id).into_bytes(), "report keyed by node/id");
            got.insert((r.node, r.id, r.table, r.conflict_type, r.resolution, r.remote_origin));
        }
        Ok(got == want)
    })
    .await
}

const IE: &str = "insert_exists";
const UOD: &str = "update_origin_differs";
const UD: &str = "update_deleted";
const DOD: &str = "delete_origin_differs";
const UM: &str = "update_missing";
const DM: &str = "delete_missing";
const UE: &str = "update_exists";
const REMOTE: &str = "apply_remote";
const LOCAL: &str = "keep_local";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_update_wins() -> anyhow::Result<()> {
    run(
        "last_update_wins",
        &[
            Expect { table: "ie", n1: (Some("n2"), Some((IE, REMOTE))), n2: (Some("n2"), Some((IE, LOCAL))) },
            Expect { table: "uod", n1: (Some("n2"), Some((UOD, REMOTE))), n2: (Some("n2"), Some((UOD, LOCAL))) },
            // The delete is later: the row is gone everywhere.
            Expect { table: "dl", n1: (None, Some((DOD, REMOTE))), n2: (None, Some((UD, LOCAL))) },
            // The update is later: the row is back everywhere with the update's values.
            Expect { table: "ul", n1: (Some("n2"), Some((UD, REMOTE))), n2: (Some("n2"), Some((DOD, LOCAL))) },
            Expect { table: "um", n1: (Some("n1"), None), n2: (Some("n1"), Some((UM, REMOTE))) },
            Expect { table: "dm", n1: (None, None), n2: (None, Some((DM, REMOTE))) },
            Expect { table: "ue", n1: (None, Some((UE, REMOTE))), n2: (None, Some((UE, LOCAL))) },
        ],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_update_wins() -> anyhow::Result<()> {
    run(
        "first_update_wins",
        &[
            Expect { table: "ie", n1: (Some("n1"), Some((IE, LOCAL))), n2: (Some("n1"), Some((IE, REMOTE))) },
            Expect { table: "uod", n1: (Some("n1"), Some((UOD, LOCAL))), n2: (Some("n1"), Some((UOD, REMOTE))) },
            // The update came first: it stays everywhere.
            Expect { table: "dl", n1: (Some("n1"), Some((DOD, LOCAL))), n2: (Some("n1"), Some((UD, REMOTE))) },
            // The delete came first: the row is gone everywhere.
            Expect { table: "ul", n1: (None, Some((UD, LOCAL))), n2: (None, Some((DOD, REMOTE))) },
            Expect { table: "um", n1: (Some("n1"), None), n2: (Some("n1"), Some((UM, REMOTE))) },
            Expect { table: "dm", n1: (None, None), n2: (None, Some((DM, REMOTE))) },
            Expect { table: "ue", n1: (Some("same"), Some((UE, LOCAL))), n2: (Some("same"), Some((UE, REMOTE))) },
        ],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_remote() -> anyhow::Result<()> {
    // Each node takes the other's change: they swap (this resolver does not converge by design).
    run(
        "apply_remote",
        &[
            Expect { table: "ie", n1: (Some("n2"), Some((IE, REMOTE))), n2: (Some("n1"), Some((IE, REMOTE))) },
            Expect { table: "uod", n1: (Some("n2"), Some((UOD, REMOTE))), n2: (Some("n1"), Some((UOD, REMOTE))) },
            Expect { table: "dl", n1: (None, Some((DOD, REMOTE))), n2: (Some("n1"), Some((UD, REMOTE))) },
            Expect { table: "ul", n1: (Some("n2"), Some((UD, REMOTE))), n2: (None, Some((DOD, REMOTE))) },
            Expect { table: "um", n1: (Some("n1"), None), n2: (Some("n1"), Some((UM, REMOTE))) },
            Expect { table: "dm", n1: (None, None), n2: (None, Some((DM, REMOTE))) },
            Expect { table: "ue", n1: (None, Some((UE, REMOTE))), n2: (Some("same"), Some((UE, REMOTE))) },
        ],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_local() -> anyhow::Result<()> {
    run(
        "keep_local",
        &[
            Expect { table: "ie", n1: (Some("n1"), Some((IE, LOCAL))), n2: (Some("n2"), Some((IE, LOCAL))) },
            Expect { table: "uod", n1: (Some("n1"), Some((UOD, LOCAL))), n2: (Some("n2"), Some((UOD, LOCAL))) },
            Expect { table: "dl", n1: (Some("n1"), Some((DOD, LOCAL))), n2: (None, Some((UD, LOCAL))) },
            Expect { table: "ul", n1: (None, Some((UD, LOCAL))), n2: (Some("n2"), Some((DOD, LOCAL))) },
            Expect { table: "um", n1: (Some("n1"), None), n2: (None, Some((UM, LOCAL))) },
            Expect { table: "dm", n1: (None, None), n2: (None, Some((DM, LOCAL))) },
            Expect { table: "ue", n1: (Some("same"), Some((UE, LOCAL))), n2: (Some("base1"), Some((UE, LOCAL))) },
        ],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_parks_the_remote_change() -> anyhow::Result<()> {
    const PARKED: &str = "parked";
    run(
        "manual",
        &[
            Expect { table: "ie", n1: (Some("n1"), Some((IE, PARKED))), n2: (Some("n2"), Some((IE, PARKED))) },
            Expect { table: "uod", n1: (Some("n1"), Some((UOD, PARKED))), n2: (Some("n2"), Some((UOD, PARKED))) },
            Expect { table: "dl", n1: (Some("n1"), Some((DOD, PARKED))), n2: (None, Some((UD, PARKED))) },
            Expect { table: "ul", n1: (None, Some((UD, PARKED))), n2: (Some("n2"), Some((DOD, PARKED))) },
            Expect { table: "um", n1: (Some("n1"), None), n2: (None, Some((UM, PARKED))) },
            Expect { table: "dm", n1: (None, None), n2: (None, Some((DM, PARKED))) },
            Expect { table: "ue", n1: (Some("same"), Some((UE, PARKED))), n2: (Some("base1"), Some((UE, PARKED))) },
        ],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_resolver_stops_the_stream_until_the_operator_acts() -> anyhow::Result<()> {
    let mut cluster = Cluster::create("cf_error", &["r1", "r1"], &setup(), &["public.ie", "public.marker"]).await?;
    cluster.replication_toml = "resolver = \"error\"".into();
    cluster.write_config()?;
    cluster.init()?;
    let (n1, n2) = (cluster.sql(0).await?, cluster.sql(1).await?);
    let _captures = (cluster.spawn("capture", 0)?, cluster.spawn("capture", 1)?);
    n1.batch_execute("INSERT INTO ie VALUES (1, 'n1')").await?;
    n2.batch_execute("INSERT INTO ie VALUES (1, 'n2')").await?;
    n2.batch_execute("INSERT INTO marker VALUES ('n2')").await?;
    let apply = cluster.spawn("apply", 0)?;
    // n1 stops at the conflict: the change after it (n2's marker) is not applied, the row stays.
    wait_until("n1's apply to report the conflict", Duration::from_secs(60), || async {
        Ok(std::fs::read_to_string(&apply.log)?.contains("resolver error"))
    })
    .await?;
    let markers: i64 = n1.query_one("SELECT count(*) FROM marker", &[]).await?.get(0);
    assert_eq!(markers, 0, "nothing after the conflict is applied");
    let v: String = n1.query_one("SELECT v FROM ie WHERE id = 1", &[]).await?.get(0);
    assert_eq!(v, "n1");
    // The operator picks a resolver for the table and restarts apply: the stream goes on.
    drop(apply);
    cluster.replication_toml = "resolver = \"error\"\n[replication.table.\"public.ie\"]\nresolver = \"last_update_wins\"".into();
    cluster.write_config()?;
    let _apply = cluster.spawn("apply", 0)?;
    wait_until("n2's marker on n1", Duration::from_secs(60), || async {
        Ok(n1.query_one("SELECT count(*) FROM marker", &[]).await?.get::<_, i64>(0) == 1)
    })
    .await?;
    let v: String = n1.query_one("SELECT v FROM ie WHERE id = 1", &[]).await?.get(0);
    assert_eq!(v, "n2", "the later insert wins once the table resolves by last update");
    drop(_apply);
    drop(_captures);
    cluster.cleanup().await
}

/// A two-node cluster of one table, initialized, nothing running: n1's session and n2's name.
async fn outbox_cluster(name: &str) -> anyhow::Result<(Cluster, tokio_postgres::Client, String)> {
    let cluster = Cluster::create(name, &["r1", "r1"], "CREATE TABLE t (id int PRIMARY KEY);", &["public.t"]).await?;
    cluster.init()?;
    let n1 = cluster.sql(0).await?;
    let name2 = cluster.nodes[1].name.clone();
    Ok((cluster, n1, name2))
}

/// Records a conflict of key `key` from `origin` by hand in `c` (as apply would), returning its id.
async fn record_conflict(c: &tokio_postgres::Client, key: i32, origin: &str) -> anyhow::Result<i64> {
    Ok(c.query_one(
        "INSERT INTO pgferry.conflicts (tbl, key, conflict_type, resolver, resolution, remote_op, remote_origin,
             remote_commit_ts, remote_commit_lsn)
         VALUES ('public.t', jsonb_build_array($1::int), 'insert_exists', 'last_update_wins', 'apply_remote', 'c',
                 $2, now(), '0/0')
         RETURNING id",
        &[&key, &origin],
    )
    .await?
    .get(0))
}

/// The ids of the conflict reports in `<cluster>.conflicts`, sorted (duplicates kept).
fn published_conflict_ids(cluster: &Cluster) -> anyhow::Result<Vec<i64>> {
    let schema = ConflictReport::schema()?;
    let mut ids = Vec::new();
    for m in read_topic(&cluster.endpoints.kafka, &format!("{}.conflicts", cluster.name))? {
        ids.push(ConflictReport::decode(&schema, &m.value[5..])?.id);
    }
    ids.sort_unstable();
    Ok(ids)
}

/// The outbox publishes by snapshot, not by id: a conflict whose transaction commits after a
/// later id was already published still reaches the topic, once; on a node whose conflict rows
/// predate the outbox (no `writer_xid`), the first round publishes the rows the earlier outbox had
/// not marked published, and only those.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicts_committed_out_of_id_order_are_published_once() -> anyhow::Result<()> {
    let (cluster, n1, name2) = outbox_cluster("cf_outbox").await?;
    // As an earlier pgferry left them: one row published (marked), one not, neither with a writer.
    let legacy_published = record_conflict(&n1, 1, &name2).await?;
    let legacy_unpublished = record_conflict(&n1, 2, &name2).await?;
    n1.batch_execute(&format!(
        "UPDATE pgferry.conflicts SET writer_xid = NULL;
         UPDATE pgferry.conflicts SET published_at = now() WHERE id = {legacy_published};"
    ))
    .await?;

    let _apply = cluster.spawn("apply", 0)?;
    let published = || published_conflict_ids(&cluster);
    wait_until("the legacy unpublished conflict published", Duration::from_secs(60), || async {
        Ok(published()?.contains(&legacy_unpublished))
    })
    .await?;

    // A takes an id and stays open; B takes a later id and commits; B is published first.
    let a = cluster.sql(0).await?;
    a.batch_execute("BEGIN").await?;
    let early = record_conflict(&a, 3, &name2).await?;
    let late = record_conflict(&n1, 4, &name2).await?;
    assert!(early < late);
    wait_until("the later id published", Duration::from_secs(60), || async {
        Ok(published()?.contains(&late))
    })
    .await?;
    // The round that published B has stored its snapshot before A commits (the outbox's row
    // changes after B is sent): wait for that, so A commits after the snapshot moved past B.
    wait_until("the outbox's snapshot past B", Duration::from_secs(60), || async {
        let r = n1
            .query_opt(
                "SELECT 1 FROM pgferry.conflicts_outbox o, pgferry.conflicts c
                 WHERE c.id = $1 AND pg_visible_in_snapshot(c.writer_xid, o.published_upto)",
                &[&late],
            )
            .await?;
        Ok(r.is_some())
    })
    .await?;
    a.batch_execute("COMMIT").await?;
    wait_until("the earlier id, committed later, published", Duration::from_secs(60), || async {
        Ok(published()?.contains(&early))
    })
    .await?;
    // One more conflict after it: once it is out, every round up to it has run.
    let after = record_conflict(&n1, 5, &name2).await?;
    wait_until("the last conflict published", Duration::from_secs(60), || async {
        Ok(published()?.contains(&after))
    })
    .await?;
    assert_eq!(
        published()?,
        vec![legacy_unpublished, early, late, after],
        "each conflict published once; the one the earlier outbox had marked published is not published again"
    );
    drop(_apply);
    cluster.cleanup().await
}

/// A round of several pages (1,200 conflicts, each from its own transaction, recorded while
/// apply is stopped after its first round stored a snapshot): every one is published, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_of_many_pages_publishes_every_conflict_once() -> anyhow::Result<()> {
    let (cluster, n1, name2) = outbox_cluster("cf_pages").await?;
    let apply = cluster.spawn("apply", 0)?;
    wait_until("the outbox's first snapshot stored", Duration::from_secs(60), || async {
        Ok(n1.query_opt("SELECT 1 FROM pgferry.conflicts_outbox", &[]).await?.is_some())
    })
    .await?;
    drop(apply);
    let mut want = Vec::new();
    for key in 0..1200 {
        want.push(record_conflict(&n1, key, &name2).await?);
    }
    let _apply = cluster.spawn("apply", 0)?;
    let published = || published_conflict_ids(&cluster);
    wait_until("1,200 conflicts published", Duration::from_secs(120), || async { Ok(published()?.len() >= want.len()) }).await?;
    assert_eq!(published()?, want, "every conflict published once");
    drop(_apply);
    cluster.cleanup().await
}
