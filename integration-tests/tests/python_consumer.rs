//! An analytics tap outside Rust: `integration-tests/python/reconstruct.py` reads a pgferry
//! topic with confluent-kafka's own `SchemaRegistryClient` + `AvroDeserializer`, applies the
//! Debezium ops to an in-memory table and prints it; the result must equal the source table.
//!
//! The Python interpreter is `PGFERRY_PYTHON` (deploy/local/test.sh sets it to the venv that
//! deploy/local/install.sh builds), else `.local/python-venv/bin/python` of the repository.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use pgferry_integration_tests::{wait_until, Cluster};
use serde_json::Value;

fn python() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("PGFERRY_PYTHON") {
        let p = PathBuf::from(p);
        if !p.exists() {
            bail!("PGFERRY_PYTHON={} does not exist: run deploy/local/install.sh", p.display());
        }
        return Ok(p);
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.local/python-venv/bin/python");
    if venv.exists() {
        return Ok(venv);
    }
    bail!(
        "no Python with confluent-kafka: set PGFERRY_PYTHON or run deploy/local/install.sh \
         (it creates {})",
        venv.display()
    )
}

const SETUP: &str = "
CREATE TABLE tap (
    id int PRIMARY KEY, big bigint, small smallint, amount numeric, label text,
    happened timestamptz, day date, local_ts timestamp, at_time time, flag bool, doc jsonb,
    raw bytea, ratio float8, tag uuid
);
CREATE TABLE tap_pair (region text, seq bigint, note text, PRIMARY KEY (region, seq));
";

/// The table on the node in reconstruct.py's canonical form (docs/analytics.md).
const EXPECTED_TAP: &str = r#"
SELECT coalesce(json_agg(json_build_object(
    'id', id::text, 'big', big::text, 'small', small::text, 'amount', amount::text,
    'label', label,
    'happened', to_char(happened AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
    'day', to_char(day, 'YYYY-MM-DD'),
    'local_ts', to_char(local_ts, 'YYYY-MM-DD"T"HH24:MI:SS.US'),
    'at_time', to_char(at_time::interval, 'HH24:MI:SS.US'),
    'flag', flag::text, 'doc', doc, 'raw', raw::text, 'ratio', ratio::text, 'tag', tag::text
) ORDER BY id), '[]')::text FROM tap
"#;

const EXPECTED_PAIR: &str = r#"
SELECT coalesce(json_agg(json_build_object('region', region, 'seq', seq::text, 'note', note)
    ORDER BY region, seq), '[]')::text FROM tap_pair
"#;

const WRITES: &str = r#"
INSERT INTO tap VALUES
  (1, 9223372036854775807, -32768, 12345678901234567890.000000000000000001, 'plain',
   '2024-02-29 23:59:59.999999+05:30', '2024-02-29', '1999-12-31 23:59:59.5', '13:14:15.161718',
   true, '{"a": [1, 2.5, "x"], "b": {"c": null}}', '\x00ff10', 3.25, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'),
  (2, -1, 7, -0.5, 'héllo wörld ✓ 日本語 🚀 "quoted" \ back', '1970-01-01 00:00:00+00', '1969-12-31',
   '1900-01-01 00:00:00', '00:00:00', false, '[]', '\x', -1e-05, NULL),
  (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
  (4, 4, 4, 'NaN', '', '2262-04-11 23:47:16.854775+00', '0001-01-01', '2038-01-19 03:14:08',
   '24:00:00', true, '"just a string"', '\xdeadbeef', 1.5e+300, '00000000-0000-0000-0000-000000000000'),
  (5, 5, 5, 5, 'to be deleted', now(), current_date, now()::timestamp, now()::time, true, '{}',
   NULL, 0, NULL);
UPDATE tap SET label = E'line\nbreak\ttab', amount = amount * 2, doc = doc || '{"d": 1}',
    happened = '2024-06-01 12:00:00.000001+00' WHERE id = 1;
UPDATE tap SET big = NULL, flag = NULL, label = 'updated to NULLs' WHERE id = 2;
UPDATE tap SET id = 30, label = 'key changed' WHERE id = 3;
DELETE FROM tap WHERE id = 5;
INSERT INTO tap (id, label) VALUES (6, 'inserted after the delete');
BEGIN;
INSERT INTO tap (id, label, day) VALUES (7, 'same transaction', '2000-01-01');
UPDATE tap SET label = 'same transaction, updated' WHERE id = 7;
INSERT INTO tap (id, label) VALUES (8, 'gone within its transaction');
DELETE FROM tap WHERE id = 8;
COMMIT;
INSERT INTO tap_pair VALUES ('eu', 1, 'before the truncate'), ('us', 1, 'also');
TRUNCATE tap_pair;
INSERT INTO tap_pair VALUES ('eu', 2, 'after the truncate'), ('eu', 10, 'x'), ('ap', 1, NULL);
UPDATE tap_pair SET note = 'ten' WHERE region = 'eu' AND seq = 10;
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_consumer_rebuilds_the_table() -> Result<()> {
    let python = python()?;
    let cluster = Cluster::start(
        "pytap",
        &["r1", "r1"],
        SETUP,
        &["public.tap", "public.tap_pair"],
    )
    .await?;
    let mut capture = cluster.spawn("capture", 0)?;
    let n1 = cluster.sql(0).await?;
    n1.batch_execute(WRITES).await.context("writing on n1")?;
    // A message and heartbeats share the partition: the consumer must skip them.
    n1.batch_execute("SELECT pg_logical_emit_message(true, 'analytics.note', 'not a row')")
        .await?;

    // Everything written is in Kafka once capture has confirmed the slot past it (capture
    // confirms only after the Kafka transaction holding it committed).
    let lsn: String = n1
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    let slot = cluster.slot_of(0);
    let waited = wait_until("capture to confirm the writes", Duration::from_secs(60), || {
        let (n1, slot, lsn) = (&n1, slot.clone(), lsn.clone());
        async move {
            let row = n1
                .query_one(
                    "SELECT coalesce(confirmed_flush_lsn >= $2::text::pg_lsn, false) \
                     FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot, &lsn],
                )
                .await?;
            Ok(row.get::<_, bool>(0))
        }
    })
    .await;
    if let Err(e) = waited {
        bail!("{e}\n{}", cluster.logs());
    }

    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/reconstruct.py");
    let topic = cluster.topic_of(0);
    let out = Command::new(&python)
        .arg(&script)
        .args(["--bootstrap", &cluster.endpoints.kafka])
        .args(["--registry", &cluster.endpoints.registry])
        .args(["--topic", &topic])
        .args(["--table", "public.tap", "--table", "public.tap_pair"])
        .output()
        .with_context(|| format!("running {} {}", python.display(), script.display()))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("reconstruct.py failed ({}):\n{stderr}", out.status);
    }
    let got: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("reconstruct.py printed no JSON: {}", String::from_utf8_lossy(&out.stdout)))?;
    eprintln!("reconstruct.py: {}", stderr.trim());
    assert!(
        stderr.contains("'heartbeat'") || stderr.contains("'message'"),
        "the topic should have held non-change records too: {stderr}"
    );

    for (table, query, rows) in [("public.tap", EXPECTED_TAP, 6), ("public.tap_pair", EXPECTED_PAIR, 3)] {
        let text: String = n1.query_one(query, &[]).await?.get(0);
        let expected: Value = serde_json::from_str(&text)?;
        assert_eq!(expected.as_array().map(Vec::len), Some(rows), "{table} on n1: {expected:#}");
        assert_eq!(
            got[table], expected,
            "{table}: rebuilt from Kafka (left) differs from n1 (right)"
        );
    }

    capture.kill();
    drop(capture);
    cluster.cleanup().await
}
