//! Forwarding for cascades: n1 (region a) → hub n2 (forwards n1) → n3, which reads only the
//! hub's region. n3 gets n1's rows with origin n1 in the events, every node converges, and
//! nothing loops or arrives twice.

use std::collections::BTreeMap;
use std::time::Duration;

use pgferry_integration_tests::{read_topic, Cluster, TopicMessage};

const SETUP: &str = "CREATE TABLE t (id int PRIMARY KEY, who text NOT NULL, hits int NOT NULL DEFAULT 0);";

/// Commit LSN header → number of `change` and `message` events of `origin` in `msgs`.
fn by_commit(msgs: &[TopicMessage], origin: &str) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for m in msgs.iter().filter(|m| m.header("pgferry-origin") == Some(origin)) {
        if matches!(m.header("pgferry-kind"), Some("change" | "message")) {
            *out.entry(m.header("pgferry-commit-lsn").unwrap_or_default().to_string())
                .or_insert(0) += 1;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_forwards_to_a_region_that_reads_only_the_hub() -> anyhow::Result<()> {
    let mut cluster = Cluster::create("cascade", &["a", "hub", "b"], SETUP, &["public.t"]).await?;
    cluster.nodes[1].extra_toml = format!("forward_origins = [\"{}\"]", cluster.nodes[0].name);
    cluster.nodes[2].extra_toml = "read_regions = [\"hub\"]".into();
    cluster.write_config()?;
    cluster.init()?;
    let _services: Vec<_> = (0..3).map(|i| cluster.spawn("run", i)).collect::<Result<_, _>>()?;

    let n1 = cluster.sql(0).await?;
    for i in 0..40 {
        n1.batch_execute(&format!("INSERT INTO t (id, who) VALUES ({i}, 'n1')")).await?;
    }
    n1.batch_execute(
        "BEGIN;
         UPDATE t SET hits = hits + 1 WHERE id < 10;
         SELECT pg_logical_emit_message(true, 'app.audit', 'bumped 10');
         COMMIT;",
    )
    .await?;
    // The other nodes write too: n3's rows reach n1 directly and n2; n2's reach both.
    cluster.sql(1).await?.batch_execute("INSERT INTO t (id, who) SELECT g, 'n2' FROM generate_series(100, 109) g").await?;
    cluster.sql(2).await?.batch_execute("INSERT INTO t (id, who) SELECT g, 'n3' FROM generate_series(200, 209) g").await?;

    let (_, rows) = cluster.wait_converged("t", Duration::from_secs(90)).await?;
    assert_eq!(rows, 60);
    let n3 = cluster.sql(2).await?;
    let bumped: i64 = n3.query_one("SELECT sum(hits) FROM t WHERE who = 'n1'", &[]).await?.get(0);
    assert_eq!(bumped, 10, "n1's update reached n3 through the hub exactly once");

    let a = read_topic(&cluster.endpoints.kafka, &cluster.topic_of(0))?;
    let hub = read_topic(&cluster.endpoints.kafka, &cluster.topic_of(1))?;
    let b = read_topic(&cluster.endpoints.kafka, &cluster.topic_of(2))?;
    let (n1_name, n2_name, n3_name) = (&cluster.nodes[0].name, &cluster.nodes[1].name, &cluster.nodes[2].name);

    // The hub carries every n1 transaction once, with all its events, under origin n1.
    let direct = by_commit(&a, n1_name);
    assert_eq!(direct.len(), 41, "n1's 41 transactions in its own topic");
    assert_eq!(by_commit(&hub, n1_name), direct, "forwarded: same transactions, same events, once");
    assert!(hub
        .iter()
        .filter(|m| m.header("pgferry-origin") == Some(n1_name.as_str()))
        .all(|m| m.header("pgferry-via") == Some(n2_name.as_str())));
    let forwarded_messages = hub
        .iter()
        .filter(|m| m.header("pgferry-kind") == Some("message") && m.header("pgferry-origin") == Some(n1_name.as_str()))
        .count();
    assert_eq!(forwarded_messages, 1, "the transactional message travels with its transaction");
    // Nothing else is forwarded: n1 and n3 publish only their own changes, n2 forwards only n1.
    assert!(a.iter().all(|m| m.header("pgferry-origin") == Some(n1_name.as_str())));
    assert!(b.iter().all(|m| m.header("pgferry-origin") == Some(n3_name.as_str())));
    assert!(hub.iter().all(|m| m.header("pgferry-origin") != Some(n3_name.as_str())));

    // No loop: n1 never applied its own changes back, and n3's progress for n1 is through the hub.
    let own: i64 = n1
        .query_one("SELECT count(*) FROM pgferry.apply_progress WHERE origin = $1", &[n1_name])
        .await?
        .get(0);
    assert_eq!(own, 0);
    let via: String = n3
        .query_one("SELECT topic FROM pgferry.apply_progress WHERE origin = $1", &[n1_name])
        .await?
        .get(0);
    assert_eq!(via, cluster.topic_of(1));
    drop(_services);
    cluster.cleanup().await
}
