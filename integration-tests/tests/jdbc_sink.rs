//! A real Debezium-format consumer: Debezium's JDBC sink connector in Kafka Connect (standalone
//! worker of the broker's Kafka version), reading a pgferry topic through Apicurio's Avro
//! converter (Confluent wire format, schema by content id), writes a separate PostgreSQL
//! database; the result must equal the source table row for row.
//!
//! Jars: `PGFERRY_KAFKA_LIBS` (Kafka, which includes Connect) and `PGFERRY_CONNECT_PLUGINS`
//! (plugin directories `debezium-jdbc/` and `apicurio-converter/`), both set by
//! deploy/local/test.sh from what deploy/local/install.sh fetched from Maven Central.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use pgferry_integration_tests::{connect, free_local_addr, Cluster};

fn dir_from_env(var: &str) -> Result<PathBuf> {
    let Some(p) = std::env::var_os(var) else {
        bail!("{var} is not set: run the tests through deploy/local/test.sh (install.sh fetches the jars)");
    };
    let p = PathBuf::from(p);
    if !p.is_dir() {
        bail!("{var}={} is not a directory: run deploy/local/install.sh", p.display());
    }
    Ok(p)
}

/// The Connect worker, killed when dropped.
struct Worker(Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// Same DDL at the source and the sink: the sink writes into the existing table.
const TABLE: &str = "
CREATE TABLE sinked (
    id int PRIMARY KEY, big bigint, small smallint, amount numeric, label text,
    happened timestamptz, day date, local_ts timestamp, at_time time, flag bool, doc jsonb,
    raw bytea, ratio float8, tag uuid
);
";

const WRITES: &str = r#"
INSERT INTO sinked VALUES
  (1, 9223372036854775807, -32768, 12345678901234567890.000000000000000001, 'plain',
   '2024-02-29 23:59:59.999999+05:30', '2024-02-29', '1999-12-31 23:59:59.5', '13:14:15.161718',
   true, '{"a": [1, 2.5, "x"], "b": {"c": null}}', '\x00ff10', 3.25, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'),
  (2, -1, 7, -0.5, 'héllo wörld ✓ 日本語 🚀 "quoted" \ back', '1970-01-01 00:00:00+00', '1969-12-31',
   '1900-01-01 00:00:00', '00:00:00', false, '[]', '\x', -1e-05, NULL),
  (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
  (4, 4, 4, 'NaN', '', '2262-04-11 23:47:16.854775+00', '0001-01-01', '2038-01-19 03:14:08',
   '23:59:59.999999', true, '"just a string"', '\xdeadbeef', 1.5e+300, '00000000-0000-0000-0000-000000000000'),
  (5, 5, 5, 5, 'to be deleted', now(), current_date, now()::timestamp, now()::time, true, '{}',
   NULL, 0, NULL);
UPDATE sinked SET label = E'line\nbreak\ttab', amount = amount * 2, doc = doc || '{"d": 1}',
    happened = '2024-06-01 12:00:00.000001+00' WHERE id = 1;
UPDATE sinked SET big = NULL, flag = NULL, label = 'updated to NULLs' WHERE id = 2;
DELETE FROM sinked WHERE id = 5;
INSERT INTO sinked (id, label) VALUES (6, 'inserted after the delete');
BEGIN;
INSERT INTO sinked (id, label, day) VALUES (7, 'same transaction', '2000-01-01');
UPDATE sinked SET label = 'same transaction, updated' WHERE id = 7;
INSERT INTO sinked (id, label) VALUES (8, 'gone within its transaction');
DELETE FROM sinked WHERE id = 8;
COMMIT;
SELECT pg_logical_emit_message(true, 'analytics.note', 'not a row');
"#;

/// Every row's text form, ordered: equal strings mean equal tables.
async fn rows(dsn: &str) -> Result<String> {
    let c = connect(dsn).await?;
    Ok(c.query_one(
        "SELECT coalesce(string_agg(t::text, E'\\n' ORDER BY t.id), '') FROM sinked t",
        &[],
    )
    .await?
    .get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debezium_jdbc_sink_copies_the_table() -> Result<()> {
    let kafka_libs = dir_from_env("PGFERRY_KAFKA_LIBS")?;
    let plugins = dir_from_env("PGFERRY_CONNECT_PLUGINS")?;
    let cluster = Cluster::start("jdbcsink", &["r1", "r1"], TABLE, &["public.sinked"]).await?;

    // The sink database: on server 2, outside the pgferry cluster.
    let sink_db = format!("{}_sink", cluster.name);
    let server2 = &cluster.endpoints.pg[1];
    connect(server2)
        .await?
        .batch_execute(&format!("CREATE DATABASE \"{sink_db}\""))
        .await?;
    let sink_dsn = format!("{}/{sink_db}", server2.rsplit_once('/').unwrap().0);
    connect(&sink_dsn).await?.batch_execute(TABLE).await?;

    let mut capture = cluster.spawn("capture", 0)?;
    cluster.sql(0).await?.batch_execute(WRITES).await?;

    let registry_v2 = cluster.endpoints.registry.replace("/apis/ccompat/v7", "/apis/registry/v2");
    let dir = &cluster.dir;
    let converter = |side: &str| {
        format!(
            "{side}.converter=io.apicurio.registry.utils.converter.AvroConverter\n\
             {side}.converter.apicurio.registry.url={registry_v2}\n\
             {side}.converter.apicurio.registry.as-confluent=true\n\
             {side}.converter.apicurio.registry.use-id=contentId\n\
             {side}.converter.apicurio.registry.headers.enabled=false\n"
        )
    };
    let worker_props = dir.join("worker.properties");
    std::fs::write(
        &worker_props,
        format!(
            "bootstrap.servers={kafka}\n{key}{value}\
             offset.storage.file.filename={offsets}\n\
             offset.flush.interval.ms=1000\n\
             plugin.path={plugins}\n\
             listeners=http://{listen}\n\
             consumer.isolation.level=read_committed\n\
             consumer.auto.offset.reset=earliest\n\
             plugin.discovery=service_load\n",
            kafka = cluster.endpoints.kafka,
            key = converter("key"),
            value = converter("value"),
            offsets = dir.join("connect.offsets").display(),
            plugins = plugins.display(),
            listen = free_local_addr()?,
        ),
    )?;
    let (host_port, db) = sink_dsn
        .rsplit_once('@')
        .map(|(_, rest)| rest.split_once('/').unwrap())
        .unwrap();
    let sink_props = dir.join("sink.properties");
    std::fs::write(
        &sink_props,
        format!(
            // The worker's consumer group is connect-<name>: unique, so a killed worker of an
            // earlier run (still a member until its session times out) cannot delay this one.
            "name={name}\n\
             connector.class=io.debezium.connector.jdbc.JdbcSinkConnector\n\
             tasks.max=1\n\
             topics={topic}\n\
             connection.url=jdbc:postgresql://{host_port}/{db}?stringtype=unspecified\n\
             connection.username=postgres\n\
             connection.password={pw}\n\
             insert.mode=upsert\n\
             delete.enabled=true\n\
             primary.key.mode=record_key\n\
             schema.evolution=none\n\
             collection.name.format=${{source.table}}\n",
            name = format!("{}-jdbc-sink", cluster.name),
            topic = cluster.topic_of(0),
            pw = pgferry_integration_tests::PG_PASSWORD,
        ),
    )?;
    let log4j = dir.join("connect-log4j2.properties");
    std::fs::write(
        &log4j,
        "status = warn\nappender.out.type = Console\nappender.out.name = OUT\n\
         appender.out.layout.type = PatternLayout\nappender.out.layout.pattern = [%d] %p %m (%c)%n\n\
         rootLogger.level = INFO\nrootLogger.appenderRef.out.ref = OUT\n",
    )?;
    let log = dir.join("connect.log");
    let out = std::fs::File::create(&log)?;
    let mut worker = Worker(
        Command::new("java")
            .args(["-Xmx512m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1"])
            .arg(format!("-Dlog4j2.configurationFile={}", log4j.display()))
            .arg("-cp")
            .arg(format!("{}/*", kafka_libs.display()))
            .arg("org.apache.kafka.connect.cli.ConnectStandalone")
            .arg(&worker_props)
            .arg(&sink_props)
            .stdout(out.try_clone()?)
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .context("starting java (Kafka Connect)")?,
    );

    let started = std::time::Instant::now();
    let source_dsn = cluster.nodes[0].dsn.clone();
    // Polls until equal; stops early when the worker died.
    let deadline = started + Duration::from_secs(120);
    let waited: Result<()> = loop {
        if let Ok(Some(status)) = worker.0.try_wait() {
            break Err(anyhow::anyhow!("Kafka Connect exited: {status}"));
        }
        if rows(&source_dsn).await? == rows(&sink_dsn).await? {
            break Ok(());
        }
        if std::time::Instant::now() > deadline {
            break Err(anyhow::anyhow!("the sink table differs from the source after 120 s"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    if let Err(e) = waited {
        let connect_log = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = connect_log.lines().rev().take(60).collect();
        bail!(
            "{e}\nsource:\n{}\nsink:\n{}\n--- connect.log (last lines)\n{}\n{}",
            rows(&source_dsn).await?,
            rows(&sink_dsn).await.unwrap_or_else(|e| e.to_string()),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
            cluster.logs()
        );
    }

    // The logical message (and any heartbeat) in the partition is skipped, not written.
    let connect_log = std::fs::read_to_string(&log).unwrap_or_default();
    let skipped = connect_log.matches("isn't a Debezium record").count();
    assert!(skipped >= 1, "no non-change record was skipped; connect.log:\n{connect_log}");
    eprintln!("sink equal to source after {:?}; {skipped} non-change records skipped", started.elapsed());
    drop(worker);
    capture.kill();
    drop(capture);
    connect(server2)
        .await?
        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{sink_db}\" WITH (FORCE)"))
        .await?;
    cluster.cleanup().await
}
