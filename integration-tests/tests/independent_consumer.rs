//! A consumer that knows nothing of pgferry's crates reads the change events: Confluent wire
//! format parsed by hand, writer schema fetched from the registry by id, datum decoded with
//! apache-avro, Debezium-style `before`/`after`/`op` checked field by field.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value;
use apache_avro::Schema;
use pgferry_integration_tests::{read_topic, wait_until, Cluster, TopicMessage};

/// Schemas fetched from the registry, by id.
struct Registry {
    url: String,
    http: reqwest::Client,
    cache: HashMap<u32, Schema>,
}

impl Registry {
    fn new(url: &str) -> Registry {
        Registry {
            url: url.trim_end_matches('/').to_string(),
            http: reqwest::Client::new(),
            cache: HashMap::new(),
        }
    }

    async fn schema(&mut self, id: u32) -> Result<&Schema> {
        if !self.cache.contains_key(&id) {
            let url = format!("{}/schemas/ids/{id}", self.url);
            let resp = self.http.get(&url).send().await.with_context(|| format!("GET {url}"))?;
            let status = resp.status();
            let body: serde_json::Value = resp.json().await.with_context(|| format!("GET {url}: body"))?;
            if !status.is_success() {
                bail!("GET {url}: {status}: {body}");
            }
            let text = body["schema"]
                .as_str()
                .ok_or_else(|| anyhow!("GET {url}: no `schema` string in {body}"))?;
            let schema = Schema::parse_str(text).with_context(|| format!("parsing schema {id}: {text}"))?;
            self.cache.insert(id, schema);
        }
        Ok(&self.cache[&id])
    }

    /// Decodes one Confluent-framed datum: magic 0, 4-byte big-endian schema id, Avro binary.
    async fn decode(&mut self, bytes: &[u8]) -> Result<Value> {
        if bytes.len() < 5 {
            bail!("frame of {} bytes is shorter than the 5-byte header", bytes.len());
        }
        if bytes[0] != 0 {
            bail!("magic byte is {}, not 0", bytes[0]);
        }
        let id = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
        let schema = self.schema(id).await?;
        let mut slice = &bytes[5..];
        let value = GenericDatumReader::builder(schema).build()?.read_value(&mut slice)?;
        if !slice.is_empty() {
            bail!("{} bytes left after the datum (schema {id})", slice.len());
        }
        Ok(value)
    }

    async fn subjects(&self) -> Result<Vec<String>> {
        let url = format!("{}/subjects", self.url);
        Ok(self.http.get(&url).send().await?.error_for_status()?.json().await?)
    }
}

/// A record's field (unions unwrapped).
fn field<'a>(v: &'a Value, name: &str) -> &'a Value {
    let v = unwrap_union(v);
    match v {
        Value::Record(fields) => fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| unwrap_union(v))
            .unwrap_or_else(|| panic!("no field {name} in {v:?}")),
        other => panic!("looking for field {name} in a non-record {other:?}"),
    }
}

fn unwrap_union(v: &Value) -> &Value {
    match v {
        Value::Union(_, inner) => unwrap_union(inner),
        other => other,
    }
}

fn string(v: &Value) -> &str {
    match v {
        Value::String(s) => s,
        other => panic!("expected a string, got {other:?}"),
    }
}

async fn changes(kafka: &str, topic: &str) -> Result<Vec<TopicMessage>> {
    let mut msgs: Vec<TopicMessage> = read_topic(kafka, topic)?
        .into_iter()
        .filter(|m| m.header("pgferry-kind") == Some("change"))
        .collect();
    msgs.sort_by_key(|m| (m.partition, m.offset));
    Ok(msgs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn independent_consumer_reads_before_after_op() -> Result<()> {
    let cluster = Cluster::start(
        "indep",
        &["r1", "r1"],
        "CREATE TABLE items (id bigint PRIMARY KEY, name text, price numeric, active bool)",
        &["public.items"],
    )
    .await?;
    let mut service = cluster.spawn("run", 0)?;
    let n1 = cluster.sql(0).await?;
    n1.batch_execute("INSERT INTO items VALUES (1, 'apple', 12.50, true)")
        .await?;
    n1.batch_execute("UPDATE items SET name = 'pear', price = 7.125 WHERE id = 1")
        .await?;
    n1.batch_execute("DELETE FROM items WHERE id = 1").await?;

    let topic = cluster.topic_of(0);
    let kafka = cluster.endpoints.kafka.clone();
    let waited = wait_until("3 change events on the topic", Duration::from_secs(60), || {
        let (kafka, topic) = (kafka.clone(), topic.clone());
        async move { Ok(changes(&kafka, &topic).await?.len() >= 3) }
    })
    .await;
    if let Err(e) = waited {
        bail!("{e}\n{}", cluster.logs());
    }
    let msgs = changes(&kafka, &topic).await?;
    assert_eq!(msgs.len(), 3, "exactly 3 change events: {msgs:?}");
    let origin = cluster.nodes[0].name.as_str();
    for m in &msgs {
        assert_eq!(m.header("pgferry-origin"), Some(origin), "origin header of {m:?}");
        assert!(
            m.header("pgferry-commit-lsn").is_some_and(|l| !l.is_empty()),
            "commit-lsn header of {m:?}"
        );
    }

    let mut reg = Registry::new(&cluster.endpoints.registry);
    let mut events = Vec::new();
    for m in &msgs {
        let key = reg.decode(&m.key).await.context("decoding the key")?;
        let value = reg.decode(&m.value).await.context("decoding the value")?;
        events.push((key, value));
    }

    // Insert.
    let (key, ev) = &events[0];
    assert_eq!(field(key, "id"), &Value::Long(1));
    assert_eq!(string(field(ev, "op")), "c");
    assert_eq!(field(ev, "before"), &Value::Null);
    let after = field(ev, "after");
    assert_eq!(field(after, "id"), &Value::Long(1));
    assert_eq!(string(field(after, "name")), "apple");
    assert_eq!(string(field(after, "price")), "12.50");
    assert_eq!(field(after, "active"), &Value::Boolean(true));
    let source = field(ev, "source");
    assert_eq!(string(field(source, "origin")), origin);
    assert_eq!(string(field(source, "table")), "items");
    assert_eq!(field(source, "txn_last"), &Value::Boolean(true));

    // Update.
    let (key, ev) = &events[1];
    assert_eq!(field(key, "id"), &Value::Long(1));
    assert_eq!(string(field(ev, "op")), "u");
    let after = field(ev, "after");
    assert_eq!(field(after, "id"), &Value::Long(1));
    assert_eq!(string(field(after, "name")), "pear");
    assert_eq!(string(field(after, "price")), "7.125");
    assert_eq!(field(after, "active"), &Value::Boolean(true));

    // Delete.
    let (key, ev) = &events[2];
    assert_eq!(field(key, "id"), &Value::Long(1));
    assert_eq!(string(field(ev, "op")), "d");
    assert_eq!(field(field(ev, "before"), "id"), &Value::Long(1));
    assert_eq!(field(ev, "after"), &Value::Null);

    // Subjects follow TopicRecordNameStrategy.
    let subjects = reg.subjects().await?;
    for record in ["Envelope", "Key"] {
        let subject = format!("{topic}-{}.public.items.{record}", cluster.name);
        assert!(
            subjects.contains(&subject),
            "subject {subject} missing from {subjects:?}"
        );
    }

    service.kill();
    drop(service);
    cluster.cleanup().await
}
