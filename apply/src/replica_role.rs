//! Replicated rows are written as a replica: every PostgreSQL session that writes rows coming
//! from another node — apply's streams, `replay`, `node rebuild`/`node add`, `repair` — runs with
//! `session_replication_role = replica`, as PostgreSQL's own subscriptions, pglogical, Spock and
//! PGD apply.
//!
//! In that role PostgreSQL fires only triggers (and rules, and event triggers) marked `ENABLE
//! REPLICA` or `ENABLE ALWAYS`; ordinary (`ENABLE`, "origin") user triggers do not fire, and
//! neither do the internal triggers of foreign keys (no checks, no `ON DELETE CASCADE`/`SET NULL`
//! actions: the origin's cascaded changes arrive as changes of their own). Without it an
//! `updated_at = now()` trigger gave each node its own value and an audit trigger writing a
//! replicated table wrote its row again on every node.
//!
//! pgferry's own triggers must still fire on applied rows, so they are `ENABLE ALWAYS`: the
//! tombstone trigger on each replicated table, the statement trigger on `pgferry.row_stamps`,
//! and the DDL event triggers (applying a `CREATE TABLE` in a schema replicated whole installs
//! the new table's tombstone trigger). `init` creates them so; [`enable_own_triggers_always`]
//! upgrades nodes set up by an earlier pgferry at apply's start.
//!
//! The role needs superuser, or on PostgreSQL 15+ `GRANT SET ON PARAMETER
//! session_replication_role TO <apply's role>`.

use pgferry_connectors::postgres::PgSession;

use crate::error::ApplyError;

/// The statement that makes a session write as a replica.
pub const SET_REPLICA_ROLE: &str = "SET session_replication_role = replica";

/// What a failure to take the role means (for error messages).
pub const ROLE_NEEDS: &str =
    "setting session_replication_role = replica (apply writes as a replica so that users' triggers \
     and foreign-key actions do not fire again on applied rows; it needs superuser, or on PostgreSQL 15+ \
     GRANT SET ON PARAMETER session_replication_role TO the role pgferry connects as)";

/// Makes `sql` write as a replica for the rest of the session.
pub async fn set(sql: &PgSession) -> Result<(), ApplyError> {
    sql.client
        .batch_execute(SET_REPLICA_ROLE)
        .await
        .map_err(sql.err(ROLE_NEEDS))?;
    Ok(())
}

/// pgferry's triggers, which must fire on applied rows too.
const OWN_TRIGGERS: &str = "ARRAY['pgferry_tombstone', 'pgferry_key_change', 'pgferry_truncation', 'pgferry_stamped_xact']";
/// pgferry's DDL event triggers.
const OWN_EVENT_TRIGGERS: &str = "ARRAY['pgferry_ddl', 'pgferry_ddl_start', 'pgferry_ddl_drop']";

/// Marks pgferry's triggers and event triggers `ENABLE ALWAYS` where an earlier pgferry left them
/// `ENABLE`d for origin sessions only (one ALTER each, only where needed: it locks the table).
/// A trigger someone disabled stays disabled. Returns how many it changed.
pub async fn enable_own_triggers_always(sql: &PgSession) -> Result<usize, ApplyError> {
    let statements: Vec<String> = sql
        .client
        .query(
            &format!(
                "SELECT format('ALTER TABLE %s ENABLE ALWAYS TRIGGER %I', tgrelid::regclass, tgname)
                 FROM pg_trigger WHERE tgname = ANY ({OWN_TRIGGERS}) AND NOT tgisinternal AND tgenabled = 'O'
                 UNION ALL
                 SELECT format('ALTER EVENT TRIGGER %I ENABLE ALWAYS', evtname)
                 FROM pg_event_trigger WHERE evtname = ANY ({OWN_EVENT_TRIGGERS}) AND evtenabled = 'O'"
            ),
            &[],
        )
        .await
        .map_err(sql.err("looking up pgferry's triggers"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for statement in &statements {
        // pgferry's own set-up: not replicated as DDL (see `crate::ddl`).
        sql.client
            .batch_execute(&format!("BEGIN; SET LOCAL pgferry.local_ddl = on; {statement}; COMMIT"))
            .await
            .map_err(sql.err(format!("{statement} (pgferry's triggers fire on applied rows too)")))?;
        tracing::info!(endpoint = %sql.endpoint, statement = %statement, "pgferry trigger upgraded to fire on applied rows");
    }
    Ok(statements.len())
}
