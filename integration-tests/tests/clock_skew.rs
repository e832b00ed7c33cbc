//! Issue 16, scenario 1: clock skew and causality. n1's clock runs ahead: n3 applies n1's change
//! of a row, an application on n3 then writes the row again. Last-update-wins compares origin
//! commit times, so unless n3's write is dated after n1's, n3 keeps its version (its own) while
//! n1 and n2 reject it as older, for good. Apply waits until the node's clock has passed the
//! commit time of what it applies (at most `[apply] max_clock_skew_ms`), as PGD does with
//! `bdr.maximum_clock_skew` and action WAIT, so a local write made after an applied change is
//! always later; the wait is counted in `pgferry_apply_clock_skew_wait_seconds`. A transaction
//! dated further ahead than the maximum is applied without waiting, counted and warned about.
//!
//! The skewed clock is simulated: an event of n1's, read back from n1's partition, is forged
//! into a new transaction (next commit LSN, another row) whose commit time lies in the future,
//! and produced to n1's partition; n1 itself gets the same row under a test replication origin
//! with that commit time (as if its own clock had dated it so; capture does not publish it).

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use apache_avro::types::Value;
use pgferry_integration_tests::{
    free_local_addr, http_get, metric, produce, read_topic, wait_until, Cluster, TopicMessage,
};
use pgferry_schemas::codec::{avro_datum, decode_frame, encode_frame};

const SETUP: &str = "CREATE TABLE t (id int PRIMARY KEY, v text);";

/// The writer schema of a registered schema id.
async fn registered_schema(cluster: &Cluster, id: u32) -> Result<apache_avro::Schema> {
    let url = format!("{}/schemas/ids/{id}", cluster.endpoints.registry);
    let body: serde_json::Value = reqwest::get(&url).await?.json().await?;
    let text = body["schema"].as_str().ok_or_else(|| anyhow!("no schema in {body}"))?;
    Ok(apache_avro::Schema::parse_str(text)?)
}

/// Decodes a Confluent-framed Avro message: its schema id, schema and value.
async fn decode(cluster: &Cluster, framed: &[u8]) -> Result<(u32, apache_avro::Schema, Value)> {
    let (id, mut datum) = decode_frame(framed)?;
    let schema = registered_schema(cluster, id).await?;
    let value = apache_avro::reader::datum::GenericDatumReader::builder(&schema)
        .build()
        .and_then(|r| r.read_value(&mut datum))?;
    Ok((id, schema, value))
}

/// The field `name` of a record (through a union's branch).
fn field<'a>(v: &'a mut Value, name: &str) -> Result<&'a mut Value> {
    match v {
        Value::Union(_, inner) => field(inner, name),
        Value::Record(fields) => fields
            .iter_mut()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
            .ok_or_else(|| anyhow!("no field {name}")),
        other => bail!("not a record: {other:?}"),
    }
}

/// Sets a scalar (through a union's branch).
fn set(v: &mut Value, to: Value) {
    match v {
        Value::Union(_, inner) => set(inner, to),
        other => *other = to,
    }
}

/// A forged transaction of one insert into `t`: `valid` (n1's insert, a message of n1's
/// partition) with row `(id, v)`, commit LSN `commit_lsn` and commit time `ts_us`; produced
/// to n1's partition.
async fn produce_forged(
    cluster: &Cluster,
    valid: &TopicMessage,
    id: i32,
    v: &str,
    commit_lsn: u64,
    ts_us: i64,
) -> Result<()> {
    let (key_id, key_schema, mut key) = decode(cluster, &valid.key).await?;
    set(field(&mut key, "id")?, Value::Int(id));
    let (value_id, value_schema, mut value) = decode(cluster, &valid.value).await?;
    let after = field(&mut value, "after")?;
    set(field(after, "id")?, Value::Int(id));
    set(field(after, "v")?, Value::String(v.into()));
    let source = field(&mut value, "source")?;
    set(field(source, "ts_us")?, Value::Long(ts_us));
    set(field(source, "ts_ms")?, Value::Long(ts_us / 1000));
    set(field(source, "commit_lsn")?, Value::Long(commit_lsn as i64));
    set(field(source, "txn_seq")?, Value::Long(0));
    set(field(source, "txn_last")?, Value::Boolean(true));
    let origin = valid.header("pgferry-origin").unwrap_or_default().to_string();
    if let Ok(tx) = field(&mut value, "transaction") {
        set(field(tx, "id")?, Value::String(format!("{origin}:{commit_lsn}")));
    }
    let key = encode_frame(key_id, &avro_datum(&key_schema, key)?);
    let value = encode_frame(value_id, &avro_datum(&value_schema, value)?);
    let lsn = commit_lsn.to_string();
    let headers: Vec<(&str, &str)> = valid
        .headers
        .iter()
        .map(|(k, v)| {
            if k == "pgferry-commit-lsn" {
                (k.as_str(), lsn.as_str())
            } else {
                (k.as_str(), v.as_str())
            }
        })
        .collect();
    produce(
        &cluster.endpoints.kafka,
        &cluster.topic_of(0),
        valid.partition,
        Some(&key),
        &value,
        &headers,
    )
}

/// Writes `sql` on node `i` committed at `ts_us` (µs since 1970) under the test origin
/// `pgferry-skew-<node>`, which capture does not publish.
async fn write_dated(cluster: &Cluster, i: usize, sql: &str, ts_us: i64) -> Result<()> {
    let c = cluster.sql(i).await?;
    let origin = format!("pgferry-skew-{}", cluster.nodes[i].name);
    c.execute(
        "SELECT pg_replication_origin_create($1) WHERE NOT EXISTS (SELECT 1 FROM pg_replication_origin WHERE roname = $1)",
        &[&origin],
    )
    .await?;
    c.execute("SELECT pg_replication_origin_session_setup($1)", &[&origin])
        .await?;
    c.batch_execute("BEGIN").await?;
    c.execute(
        "SELECT pg_replication_origin_xact_setup('0/0', 'epoch'::timestamptz + $1::bigint * interval '1 microsecond')",
        &[&ts_us],
    )
    .await?;
    c.batch_execute(&format!("{sql}; COMMIT; SELECT pg_replication_origin_session_reset()"))
        .await?;
    Ok(())
}

/// The server's clock of node `i`, µs since 1970.
async fn server_now_us(cluster: &Cluster, i: usize) -> Result<i64> {
    let c = cluster.sql(i).await?;
    Ok(
        c.query_one("SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::int8", &[])
            .await?
            .get(0),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_skew_local_write_after_an_applied_change_wins_everywhere() -> Result<()> {
    let mut cluster = Cluster::create("skew", &["r1", "r1", "r1"], SETUP, &["public.t"]).await?;
    let metrics_addr = free_local_addr()?;
    cluster.nodes[2].extra_toml = format!("metrics_listen = \"{metrics_addr}\"");
    cluster.write_config()?;
    cluster.init()?;
    let services: Vec<_> = (0..3).map(|i| cluster.spawn("run", i)).collect::<Result<_, _>>()?;
    let (n1, n3) = (cluster.sql(0).await?, cluster.sql(2).await?);
    n1.batch_execute("INSERT INTO t VALUES (1, 'first')").await?;
    cluster.wait_converged("t", Duration::from_secs(60)).await?;
    let valid = read_topic(&cluster.endpoints.kafka, &cluster.topic_of(0))?
        .into_iter()
        .find(|m| {
            m.header("pgferry-kind") == Some("change")
                && m.header("pgferry-origin") == Some(cluster.nodes[0].name.as_str())
        })
        .context("n1's insert in n1's partition")?;
    let lsn: u64 = valid.header("pgferry-commit-lsn").unwrap_or_default().parse()?;

    // n1 inserts row 2 at a commit time 3 s ahead of the other nodes' clocks (less than the
    // default max_clock_skew_ms, 5 s).
    let skewed_us = server_now_us(&cluster, 2).await? + 3_000_000;
    write_dated(&cluster, 0, "INSERT INTO t VALUES (2, 'remote')", skewed_us).await?;
    produce_forged(&cluster, &valid, 2, "remote", lsn + 1, skewed_us).await?;

    // On n3, as soon as n1's row shows, an application updates it.
    wait_until("n1's skewed row on n3", Duration::from_secs(60), || async {
        Ok(n3.query_opt("SELECT 1 FROM t WHERE id = 2", &[]).await?.is_some())
    })
    .await?;
    n3.batch_execute("UPDATE t SET v = 'local after remote' WHERE id = 2")
        .await?;
    let written_us = server_now_us(&cluster, 2).await?;

    // The local write is later than n1's row everywhere: every node takes it.
    cluster.wait_converged("t", Duration::from_secs(60)).await?;
    for i in 0..3 {
        let v: String = cluster
            .sql(i)
            .await?
            .query_one("SELECT v FROM t WHERE id = 2", &[])
            .await?
            .get(0);
        assert_eq!(v, "local after remote", "node {}", i + 1);
    }
    assert!(
        written_us > skewed_us,
        "n3 applied the row only once its clock had passed its commit time"
    );
    let labels = [
        ("node", cluster.nodes[2].name.as_str()),
        ("origin", cluster.nodes[0].name.as_str()),
    ];
    let (_, text) = http_get(&metrics_addr, "/metrics").await?;
    let waits = metric(&text, "pgferry_apply_clock_skew_wait_seconds_count", &labels).unwrap_or(0.0);
    let waited = metric(&text, "pgferry_apply_clock_skew_wait_seconds_sum", &labels).unwrap_or(0.0);
    assert_eq!(waits, 1.0, "one wait counted on n3:\n{text}");
    assert!(
        waited > 1.0 && waited < 3.5,
        "n3 waited about 3 s less the delivery time, not {waited} s"
    );

    // A commit time further ahead than max_clock_skew_ms: applied at once, counted, warned.
    let far_us = server_now_us(&cluster, 2).await? + 600_000_000;
    write_dated(&cluster, 0, "INSERT INTO t VALUES (3, 'far ahead')", far_us).await?;
    let started = std::time::Instant::now();
    produce_forged(&cluster, &valid, 3, "far ahead", lsn + 2, far_us).await?;
    cluster.wait_converged("t", Duration::from_secs(60)).await?;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "not waited for (took {took:?})");
    let (_, text) = http_get(&metrics_addr, "/metrics").await?;
    assert_eq!(
        metric(&text, "pgferry_apply_clock_skew_exceeded_total", &labels),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "pgferry_apply_clock_skew_wait_seconds_count", &labels),
        Some(1.0),
        "{text}"
    );
    let log = std::fs::read_to_string(&services[2].log)?;
    assert!(
        log.contains("further ahead of this node's clock than [apply] max_clock_skew_ms"),
        "n3's log:\n{log}"
    );

    drop(services);
    cluster.cleanup().await?;
    Ok(())
}
