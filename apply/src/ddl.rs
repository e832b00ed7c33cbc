//! DDL replication (DESIGN.md, "DDL"), when `[replication] ddl = true` (off by default: apply
//! runs statement text read from the topics, so only clusters whose topics only their nodes can
//! write should turn it on; with it off, a DDL message is dead-lettered, never run).
//!
//! On every node an event trigger (installed by `pgferry init`, [`trigger_sql`]) turns a DDL
//! statement that touches a replicated table — `ALTER TABLE`, `CREATE INDEX` on it, and
//! `ALTER TYPE`/`CREATE TYPE` in a schema of a replicated table; `CREATE TABLE` in a schema
//! replicated whole — into a transactional logical
//! message with prefix [`PREFIX`] carrying the statement text and the session's `search_path`.
//! Capture publishes it in order with the transaction's rows; apply runs it ([`apply`]) in the
//! applying transaction before that origin's next change. The trigger does nothing in a session
//! that has a replication origin set up (apply's), so nothing loops.
//!
//! A session that sets `pgferry.local_ddl = on` (pgferry's own `init`) is not replicated.
//!
//! The event triggers are `ENABLE ALWAYS`: apply's sessions write as a replica
//! (`crate::replica_role`), and applying a `CREATE TABLE` must still install the table's
//! tombstone trigger.
//!
//! The whole query string of the statement is what is sent, so a string holding more statements
//! than the DDL (`ALTER …; INSERT …` in one simple query) is refused with an error: the others
//! would run again on every node. `CREATE TABLE` replicates only in a schema replicated whole
//! (`replication.schemas`): there the new table replicates from its first row, with its
//! tombstone trigger set up on every node.
//!
//! `DROP TABLE` of a replicated table (or of one in a schema replicated whole) and `DROP INDEX`
//! of an index on one replicate too: a `sql_drop` trigger matches what was dropped — tables by
//! name, indexes by the ids a `ddl_command_start` trigger noted for the replicated tables just
//! before the statement ran. Objects dropped only as dependents of another are not sent alone.

use pgferry_connectors::postgres::{quote_literal, PgSession};
use serde::{Deserialize, Serialize};

use crate::error::ApplyError;

/// Prefix of DDL messages.
pub const PREFIX: &str = "pgferry.ddl";

/// Removes the DDL event triggers (DDL replication off, or the node leaving the cluster).
pub const DROP_TRIGGERS_SQL: &str = "DROP EVENT TRIGGER IF EXISTS pgferry_ddl;
         DROP EVENT TRIGGER IF EXISTS pgferry_ddl_start;
         DROP EVENT TRIGGER IF EXISTS pgferry_ddl_drop;";

/// One replicated DDL statement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DdlMessage {
    /// The `search_path` it ran with.
    pub search_path: String,
    /// The statement text (the query string of the top-level statement).
    pub sql: String,
}

/// The event trigger that emits DDL messages, for a node replicating `tables` (`(schema,
/// table)`) and the schemas `whole` (every table in them, including new ones). Idempotent.
pub fn trigger_sql(tables: &[(String, String)], whole: &[String]) -> String {
    let array = |items: Vec<String>| {
        if items.is_empty() {
            "NULL".to_string()
        } else {
            items.join(", ")
        }
    };
    let qualified: Vec<String> = tables
        .iter()
        .map(|(s, t)| quote_literal(&format!("\"{}\".\"{}\"", s.replace('"', "\"\""), t.replace('"', "\"\""))))
        .collect();
    let mut schemas: Vec<String> = tables.iter().map(|(s, _)| quote_literal(s)).chain(whole.iter().map(|s| quote_literal(s))).collect();
    schemas.sort();
    schemas.dedup();
    let whole: Vec<String> = whole.iter().map(|s| quote_literal(s)).collect();
    format!(
        "CREATE OR REPLACE FUNCTION pgferry.send_ddl(q text) RETURNS void LANGUAGE plpgsql AS $fn$
         DECLARE
             rest text;
         BEGIN
             -- The whole query string is what replicates: refuse one that holds more than this
             -- statement (DML in it would run again on every node). Quoted text and
             -- comments may hold semicolons; they are taken out before looking.
             rest := regexp_replace(q, '''(''''|[^''])*''', '', 'g');
             rest := regexp_replace(rest, '\"(\"\"|[^\"])*\"', '', 'g');
             rest := regexp_replace(rest, '\\$([A-Za-z_]*)\\$.*?\\$\\1\\$', '', 'g');
             rest := regexp_replace(rest, '--[^\\n]*', '', 'g');
             rest := regexp_replace(rest, '/\\*.*?\\*/', '', 'g');
             rest := regexp_replace(rest, ';\\s*$', '');
             IF position(';' IN rest) > 0 THEN
                 RAISE EXCEPTION 'pgferry: DDL on a replicated table must be sent as a statement of its own, not in a query string with others: %', left(q, 200)
                     USING HINT = 'send it alone (it then replicates), or SET pgferry.local_ddl = on to run it on this node only';
             END IF;
             PERFORM pg_logical_emit_message(true, '{PREFIX}',
                 json_build_object('search_path', current_setting('search_path'), 'sql', q)::text);
             PERFORM set_config('pgferry.ddl_sent', md5(q), true);
         END $fn$;
         -- Before DROP INDEX: the ids of the replicated tables' indexes (once dropped, an
         -- index's table is no longer in the catalog).
         CREATE OR REPLACE FUNCTION pgferry.note_indexes() RETURNS event_trigger LANGUAGE plpgsql AS $fn$
         BEGIN
             PERFORM set_config('pgferry.replicated_indexes', coalesce(
                 (SELECT string_agg(indexrelid::text, ',') FROM pg_index
                  WHERE indrelid = ANY (ARRAY(SELECT to_regclass(n)::oid FROM unnest(ARRAY[{tables}]::text[]) n))), ''), true);
         END $fn$;
         CREATE OR REPLACE FUNCTION pgferry.replicate_drop() RETURNS event_trigger LANGUAGE plpgsql AS $fn$
         DECLARE
             r record;
             q text := current_query();
             tables text[] := ARRAY[{tables}]::text[];
             whole text[] := ARRAY[{whole}]::text[];
             indexes text[] := string_to_array(current_setting('pgferry.replicated_indexes', true), ',');
             replicate boolean := false;
         BEGIN
             IF current_setting('pgferry.local_ddl', true) = 'on' THEN RETURN; END IF;
             IF pg_replication_origin_session_is_setup() THEN RETURN; END IF;
             IF current_setting('pgferry.ddl_sent', true) = md5(q) THEN RETURN; END IF;
             FOR r IN SELECT * FROM pg_event_trigger_dropped_objects() WHERE original AND NOT is_temporary LOOP
                 IF (r.object_type = 'table' AND (format('\"%s\".\"%s\"', replace(r.schema_name, '\"', '\"\"'),
                                                        replace(r.object_name, '\"', '\"\"')) = ANY (tables)
                                                  OR r.schema_name = ANY (whole)))
                    OR (r.object_type = 'index' AND (r.objid::text = ANY (indexes) OR r.schema_name = ANY (whole))) THEN
                     replicate := true;
                 END IF;
             END LOOP;
             IF replicate THEN
                 PERFORM pgferry.send_ddl(q);
             END IF;
         END $fn$;
         CREATE OR REPLACE FUNCTION pgferry.replicate_ddl() RETURNS event_trigger LANGUAGE plpgsql AS $fn$
         DECLARE
             r record;
             q text := current_query();
             tables oid[] := ARRAY(SELECT to_regclass(n)::oid FROM unnest(ARRAY[{tables}]::text[]) n);
             whole text[] := ARRAY[{whole}]::text[];
             keys text;
             key_columns text;
             key_changed text;
             replicate boolean := false;
         BEGIN
             -- pgferry's own set-up (`init` re-creating its triggers): not replicated
             IF current_setting('pgferry.local_ddl', true) = 'on' THEN RETURN; END IF;
             -- a new table of a schema replicated whole gets its tombstone trigger, on every node
             -- (apply runs the CREATE TABLE too)
             FOR r IN SELECT * FROM pg_event_trigger_ddl_commands()
                      WHERE command_tag = 'CREATE TABLE' AND object_type = 'table' AND NOT in_extension
                        AND schema_name = ANY (whole) LOOP
                 SELECT string_agg(quote_literal(a.attname), ', ' ORDER BY k.ord),
                        string_agg(quote_ident(a.attname), ', ' ORDER BY k.ord),
                        string_agg(format('OLD.%1$I IS DISTINCT FROM NEW.%1$I', a.attname), ' OR ' ORDER BY k.ord)
                   INTO keys, key_columns, key_changed
                 FROM pg_index i
                 CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, ord)
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                 WHERE i.indrelid = r.objid AND i.indisprimary;
                 IF keys IS NOT NULL THEN
                     PERFORM set_config('pgferry.local_ddl', 'on', true);
                     EXECUTE format('CREATE TRIGGER pgferry_tombstone AFTER DELETE ON %s FOR EACH ROW
                                     EXECUTE FUNCTION pgferry.record_tombstone(%s)', r.objid::regclass, keys);
                     EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER pgferry_tombstone', r.objid::regclass);
                     -- a primary-key change leaves a tombstone for the old key too
                     EXECUTE format('CREATE TRIGGER pgferry_key_change AFTER UPDATE OF %s ON %s FOR EACH ROW WHEN (%s)
                                     EXECUTE FUNCTION pgferry.record_tombstone(%s)', key_columns, r.objid::regclass, key_changed, keys);
                     EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER pgferry_key_change', r.objid::regclass);
                     EXECUTE format('CREATE TRIGGER pgferry_truncation AFTER TRUNCATE ON %s FOR EACH STATEMENT
                                     EXECUTE FUNCTION pgferry.record_truncation()', r.objid::regclass);
                     EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER pgferry_truncation', r.objid::regclass);
                     PERFORM set_config('pgferry.local_ddl', 'off', true);
                 END IF;
             END LOOP;
             -- apply's own session (a replication origin is set up): never sent again
             IF pg_replication_origin_session_is_setup() THEN RETURN; END IF;
             -- several commands of one query string: sent once
             IF current_setting('pgferry.ddl_sent', true) = md5(q) THEN RETURN; END IF;
             FOR r IN SELECT * FROM pg_event_trigger_ddl_commands() LOOP
                 CONTINUE WHEN r.in_extension;
                 IF (r.object_type = 'table' AND (r.objid = ANY (tables) OR r.schema_name = ANY (whole)))
                    OR (r.object_type = 'index' AND ((SELECT indrelid FROM pg_index WHERE indexrelid = r.objid) = ANY (tables)
                                                     OR r.schema_name = ANY (whole)))
                    OR (r.object_type = 'type' AND r.schema_name = ANY (ARRAY[{schemas}]::text[])) THEN
                     replicate := true;
                 END IF;
             END LOOP;
             IF replicate THEN
                 PERFORM pgferry.send_ddl(q);
             END IF;
         END $fn$;
         {DROP_TRIGGERS_SQL}
         CREATE EVENT TRIGGER pgferry_ddl ON ddl_command_end EXECUTE FUNCTION pgferry.replicate_ddl();
         CREATE EVENT TRIGGER pgferry_ddl_start ON ddl_command_start WHEN TAG IN ('DROP INDEX')
             EXECUTE FUNCTION pgferry.note_indexes();
         CREATE EVENT TRIGGER pgferry_ddl_drop ON sql_drop EXECUTE FUNCTION pgferry.replicate_drop();
         -- they fire in apply's sessions too (session_replication_role = replica): a replicated
         -- CREATE TABLE gets its tombstone trigger there
         ALTER EVENT TRIGGER pgferry_ddl ENABLE ALWAYS;
         ALTER EVENT TRIGGER pgferry_ddl_start ENABLE ALWAYS;
         ALTER EVENT TRIGGER pgferry_ddl_drop ENABLE ALWAYS;",
        tables = array(qualified),
        whole = array(whole),
        schemas = array(schemas),
    )
}

/// The DDL a message carries, if it is one.
pub fn parse(prefix: &str, content: &[u8]) -> Option<Result<DdlMessage, String>> {
    (prefix == PREFIX).then(|| serde_json::from_slice(content).map_err(|e| format!("DDL message that does not parse: {e}")))
}

/// Runs `ddl` inside the caller's open transaction with the `search_path` it ran with on its
/// origin, then restores the session's own.
pub async fn apply(sql: &PgSession, ddl: &DdlMessage) -> Result<(), ApplyError> {
    let own: String = sql
        .client
        .query_one("SELECT current_setting('search_path')", &[])
        .await
        .map_err(sql.err("reading search_path"))?
        .get(0);
    sql.client
        .execute("SELECT set_config('search_path', $1, true)", &[&ddl.search_path])
        .await
        .map_err(sql.err("setting the DDL's search_path"))?;
    sql.client
        .batch_execute(&ddl.sql)
        .await
        .map_err(sql.err(format!("running replicated DDL {:?}", ddl.sql)))?;
    sql.client
        .execute("SELECT set_config('search_path', $1, true)", &[&own])
        .await
        .map_err(sql.err("restoring search_path"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_names_the_tables_and_their_schemas() {
        let sql = trigger_sql(&[("public".into(), "t".into()), ("app".into(), "it's".into())], &["whole".into()]);
        assert!(sql.contains(r#"'"public"."t"'"#), "{sql}");
        assert!(sql.contains(r#"'"app"."it''s"'"#), "{sql}");
        assert!(sql.contains("ARRAY['app', 'public', 'whole']"), "{sql}");
    }

    #[test]
    fn parses_only_its_prefix() {
        let m = parse(PREFIX, br#"{"search_path": "public", "sql": "ALTER TABLE t ADD c int"}"#);
        assert_eq!(m.unwrap().unwrap().sql, "ALTER TABLE t ADD c int");
        assert!(parse("app.audit", b"{}").is_none());
        assert!(parse(PREFIX, b"not json").unwrap().is_err());
    }
}
