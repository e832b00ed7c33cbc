//! TOAST and schema evolution.
//! - An UPDATE that leaves a large out-of-line value alone lists that column in
//!   `source.unchanged_toast` (its `after` value is null, never a placeholder), and the target
//!   keeps its value; with REPLICA IDENTITY FULL the old tuple fills it in instead.
//! - Adding a column registers a new schema version; events written before and after both
//!   decode with their own writer schemas, and the target gets both.

use std::time::Duration;

use pgferry_integration_tests::{read_topic, Cluster, TopicMessage};
use pgferry_schemas::{decode_frame, DecodedEvent, EnvelopeReader};

const SETUP: &str = "
CREATE TABLE doc (id int PRIMARY KEY, title text, body text);
CREATE TABLE doc_full (id int PRIMARY KEY, title text, body text);
ALTER TABLE doc_full REPLICA IDENTITY FULL;";

/// ~40 KB that does not compress, so PostgreSQL stores it out of line.
const BIG: &str = "(SELECT string_agg(md5(g::text || random()::text), '') FROM generate_series(1, 1250) g)";

/// Decodes every change event of `table` with the writer schema its frame names.
async fn decode_all(cluster: &Cluster, msgs: &[TopicMessage], table: &str) -> anyhow::Result<Vec<(u32, DecodedEvent)>> {
    let mut out = Vec::new();
    for m in msgs.iter().filter(|m| m.header("pgferry-kind") == Some("change")) {
        let (id, datum) = decode_frame(&m.value)?;
        let url = format!("{}/schemas/ids/{id}", cluster.endpoints.registry);
        let body: serde_json::Value = reqwest::get(&url).await?.json().await?;
        let reader = EnvelopeReader::new(body["schema"].as_str().unwrap_or_default())?;
        let ev = reader.decode(datum)?;
        if ev.table == table {
            out.push((id, ev));
        }
    }
    Ok(out)
}

fn value<'a>(row: &'a Option<Vec<(String, Option<String>)>>, col: &str) -> Option<&'a str> {
    row.as_ref()?.iter().find(|(c, _)| c == col)?.1.as_deref()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_toast_is_listed_not_replaced() -> anyhow::Result<()> {
    let cluster = Cluster::start("toast", &["r1", "r1"], SETUP, &["public.doc", "public.doc_full"]).await?;
    let _capture = cluster.spawn("capture", 0)?;
    let _apply = cluster.spawn("apply", 1)?;
    let n1 = cluster.sql(0).await?;
    for t in ["doc", "doc_full"] {
        n1.batch_execute(&format!("INSERT INTO {t} VALUES (1, 'v1', {BIG})")).await?;
        n1.batch_execute(&format!("UPDATE {t} SET title = 'v2' WHERE id = 1")).await?;
    }
    let stored: i32 = n1
        .query_one("SELECT pg_column_size(body) FROM doc WHERE id = 1", &[])
        .await?
        .get(0);
    assert!(stored > 8000, "the test value must be stored out of line (is {stored} bytes)");
    let (_, rows) = cluster.wait_converged("doc", Duration::from_secs(60)).await?;
    assert_eq!(rows, 1);
    cluster.wait_converged("doc_full", Duration::from_secs(60)).await?;
    let n2 = cluster.sql(1).await?;
    let (title, same): (String, bool) = {
        let r = n2
            .query_one("SELECT title, md5(body) = $1 FROM doc WHERE id = 1", &[&n1
                .query_one("SELECT md5(body) FROM doc WHERE id = 1", &[])
                .await?
                .get::<_, String>(0)])
            .await?;
        (r.get(0), r.get(1))
    };
    assert_eq!((title.as_str(), same), ("v2", true), "n2 kept the unchanged large value");

    let msgs = read_topic(&cluster.endpoints.kafka, &cluster.topic_of(0))?;
    let doc = decode_all(&cluster, &msgs, "doc").await?;
    let update = &doc.iter().find(|(_, e)| e.op.code() == "u").ok_or_else(|| anyhow::anyhow!("no update of doc"))?.1;
    assert_eq!(update.unchanged_toast, vec!["body".to_string()]);
    assert_eq!(value(&update.after, "body"), None, "no placeholder in after");
    assert_eq!(value(&update.after, "title"), Some("v2"));
    let full = decode_all(&cluster, &msgs, "doc_full").await?;
    let update = &full.iter().find(|(_, e)| e.op.code() == "u").ok_or_else(|| anyhow::anyhow!("no update of doc_full"))?.1;
    assert!(update.unchanged_toast.is_empty(), "REPLICA IDENTITY FULL fills the value in");
    assert_eq!(value(&update.after, "body").map(str::len), Some(40_000));
    drop((_capture, _apply));
    cluster.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_column_gets_a_new_schema_version() -> anyhow::Result<()> {
    let cluster = Cluster::start("evolve", &["r1", "r1"], SETUP, &["public.doc"]).await?;
    let _capture = cluster.spawn("capture", 0)?;
    let _apply = cluster.spawn("apply", 1)?;
    let n1 = cluster.sql(0).await?;
    n1.batch_execute("INSERT INTO doc VALUES (1, 'before', 'b')").await?;
    cluster.wait_converged("doc", Duration::from_secs(60)).await?;
    // DDL replication is off (the default): the column is added on the target first, then on
    // the origin (ddl.rs covers replicated DDL).
    cluster.sql(1).await?.batch_execute("ALTER TABLE doc ADD COLUMN tags text[]").await?;
    n1.batch_execute(
        "ALTER TABLE doc ADD COLUMN tags text[];
         INSERT INTO doc VALUES (2, 'after', 'b', '{x,y}');
         UPDATE doc SET tags = '{z}' WHERE id = 1;",
    )
    .await?;
    let (_, rows) = cluster.wait_converged("doc", Duration::from_secs(60)).await?;
    assert_eq!(rows, 2);

    let msgs = read_topic(&cluster.endpoints.kafka, &cluster.topic_of(0))?;
    let events = decode_all(&cluster, &msgs, "doc").await?;
    assert_eq!(events.len(), 3);
    assert_ne!(events[0].0, events[1].0, "the insert after ALTER uses a new writer schema");
    assert_eq!(events[1].0, events[2].0);
    assert!(value(&events[0].1.after, "tags").is_none());
    assert_eq!(value(&events[1].1.after, "tags"), Some("{x,y}"));
    // The registry holds both versions under the envelope's subject.
    let subject = format!("{}-{}.public.doc.Envelope", cluster.topic_of(0), cluster.name);
    let url = format!("{}/subjects/{subject}/versions", cluster.endpoints.registry);
    let versions: Vec<i64> = reqwest::get(&url).await?.json().await?;
    assert_eq!(versions.len(), 2, "versions of {subject}: {versions:?}");
    drop((_capture, _apply));
    cluster.cleanup().await
}
