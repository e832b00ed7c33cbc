//! Garbage in the topic, one test per kind — bytes that do not decode (random bytes, a frame
//! naming a schema id the registry does not have), an event claiming an origin that is not in
//! the cluster, an event for a table that does not exist on the target: apply keeps running,
//! each lands in the dead-letter topic with a reason (and in `pgferry.exceptions`), kept whole,
//! and the valid events around it are applied.

use std::time::Duration;

use anyhow::Result;
use pgferry_integration_tests::{produce, read_topic, wait_until, Cluster, Service, TopicMessage};

const SETUP: &str = "
CREATE TABLE t (id int PRIMARY KEY, v text);
CREATE TABLE gone (id int PRIMARY KEY);";

/// A two-node cluster replicating n1 → n2 with one row already applied, and a valid change
/// event read back from n1's partition (to forge others from).
struct Scene {
    cluster: Cluster,
    n1: tokio_postgres::Client,
    n2: tokio_postgres::Client,
    valid: TopicMessage,
    services: (Service, Service),
}

impl Scene {
    async fn start(test: &str) -> Result<Scene> {
        let cluster = Cluster::start(test, &["r1", "r1"], SETUP, &["public.t", "public.gone"]).await?;
        let n1 = cluster.sql(0).await?;
        let n2 = cluster.sql(1).await?;
        let services = (cluster.spawn("capture", 0)?, cluster.spawn("apply", 1)?);
        n1.batch_execute("INSERT INTO t VALUES (1, 'first')").await?;
        wait_until("the first row on n2", Duration::from_secs(60), || async {
            Ok(n2.query_one("SELECT count(*) FROM t", &[]).await?.get::<_, i64>(0) == 1)
        })
        .await?;
        let valid = read_topic(&cluster.endpoints.kafka, &cluster.topic_of(0))?
            .into_iter()
            .find(|m| m.header("pgferry-kind") == Some("change"))
            .ok_or_else(|| anyhow::anyhow!("no change event"))?;
        Ok(Scene { cluster, n1, n2, valid, services })
    }

    /// Produces a forged message into n1's partition, as the given origin.
    fn forge(&self, key: Option<&[u8]>, value: &[u8], origin: &str) -> Result<()> {
        produce(&self.cluster.endpoints.kafka, &self.cluster.topic_of(0), 0, key, value, &[
            ("pgferry-origin", origin),
            ("pgferry-commit-lsn", "18446744073709551000"),
            ("pgferry-kind", "change"),
            ("pgferry-txn-last", "1"),
        ])
    }

    /// A valid row written after the garbage reaches n2; then the dead letters' reasons, each
    /// checked to be kept whole and to name where it came from, and one exception row each.
    async fn after_garbage(self, expected: usize) -> Result<Vec<String>> {
        self.n1.batch_execute("INSERT INTO t VALUES (100, 'later')").await?;
        wait_until("the row written after the garbage on n2", Duration::from_secs(60), || async {
            Ok(self.n2.query_one("SELECT count(*) FROM t WHERE id = 100", &[]).await?.get::<_, i64>(0) == 1)
        })
        .await?;
        self.cluster.wait_converged("t", Duration::from_secs(60)).await?;
        let topic = self.cluster.topic_of(0);
        let dlq = read_topic(&self.cluster.endpoints.kafka, &format!("{}.dlq", self.cluster.name))?;
        assert!(dlq.iter().all(|m| m.header("pgferry-dlq-source").is_some_and(|s| s.starts_with(&topic))));
        let reasons: Vec<String> = dlq.iter().filter_map(|m| m.header("pgferry-dlq-reason")).map(String::from).collect();
        assert_eq!(reasons.len(), expected, "{reasons:?}");
        let exceptions: i64 = self.n2.query_one("SELECT count(*) FROM pgferry.exceptions", &[]).await?.get(0);
        assert_eq!(exceptions as usize, expected, "each dead letter is in pgferry.exceptions too");
        let Scene { cluster, services, .. } = self;
        drop(services);
        cluster.cleanup().await?;
        Ok(reasons)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_messages_are_dead_lettered_and_the_rest_applied() -> Result<()> {
    let scene = Scene::start("dlqbytes").await?;
    // Random bytes, no headers.
    let kafka = scene.cluster.endpoints.kafka.clone();
    produce(&kafka, &scene.cluster.topic_of(0), 0, None, &[0x13, 0x37, 0xde, 0xad, 0xbe, 0xef, 0x00, 0xff], &[])?;
    // A well-formed frame naming a schema id nobody registered.
    let mut unknown_id = vec![0u8, 0x7f, 0xff, 0xff, 0xf0];
    unknown_id.extend_from_slice(&scene.valid.value[5..]);
    let origin = scene.cluster.nodes[0].name.clone();
    scene.forge(Some(&scene.valid.key.clone()), &unknown_id, &origin)?;
    let dlq_topic = format!("{}.dlq", scene.cluster.name);
    let reasons = scene.after_garbage(2).await?;
    for (needle, what) in [("pgferry-origin header", "random bytes"), ("fetching schema id", "unknown schema id")] {
        assert!(reasons.iter().any(|r| r.contains(needle)), "{what}: no reason containing {needle:?} in {reasons:?}");
    }
    // Kept whole: the dead-lettered frame carries its original bytes.
    assert!(read_topic(&kafka, &dlq_topic)?.iter().any(|m| m.value == unknown_id));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_from_an_unknown_origin_is_dead_lettered_not_applied() -> Result<()> {
    let scene = Scene::start("dlqorigin").await?;
    // Row 1's insert, valid in every byte, sent again as if from "intruder" once row 1 is gone
    // on both nodes (deleted unpublished): applied, it would bring the row back on n2 alone,
    // and the nodes would differ.
    for i in 0..2 {
        scene.cluster.write_unpublished(i, "dlqtest", "DELETE FROM t WHERE id = 1").await?;
    }
    scene.forge(Some(&scene.valid.key.clone()), &scene.valid.value.clone(), "intruder")?;
    let reasons = scene.after_garbage(1).await?;
    assert!(reasons[0].contains("\"intruder\" is not a node"), "{reasons:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_for_a_table_missing_on_the_target_is_dead_lettered_and_its_transaction_applied() -> Result<()> {
    let scene = Scene::start("dlqtable").await?;
    // The table exists where it was initialized, then disappears from the target.
    scene.n2.batch_execute("DROP TABLE gone").await?;
    scene
        .n1
        .batch_execute("BEGIN; INSERT INTO t VALUES (2, 'before'); INSERT INTO gone VALUES (1); INSERT INTO t VALUES (3, 'after'); COMMIT;")
        .await?;
    // Converging on `t` means rows 2 and 3, the rest of that transaction, reached n2.
    let reasons = scene.after_garbage(1).await?;
    assert!(reasons[0].contains("gone: table does not exist"), "{reasons:?}");
    Ok(())
}
