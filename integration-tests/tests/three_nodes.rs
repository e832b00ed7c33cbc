//! Three nodes in two regions, all writing disjoint keys concurrently: afterwards the table is
//! identical everywhere, every source transaction is in the topics exactly once (no loop, no
//! duplicate), and every node's progress shows each origin applied up to its last commit.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use pgferry_integration_tests::{read_topic, Cluster};

const SETUP: &str = "CREATE TABLE acct (id bigint PRIMARY KEY, node int NOT NULL, v bigint, note text);";

/// What one writer committed.
#[derive(Debug, Default)]
struct Written {
    txns: u64,
    row_changes: u64,
}

/// Random inserts, updates and deletes of the writer's own keys, one to three per transaction.
async fn writer(client: tokio_postgres::Client, node: i64, txns: u64, seed: u64) -> anyhow::Result<Written> {
    let mut rng = seed;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut live: Vec<i64> = Vec::new();
    let mut next_key = node * 1_000_000;
    let mut written = Written::default();
    for _ in 0..txns {
        let changes = 1 + next() % 3;
        let mut sql = String::from("BEGIN;");
        for _ in 0..changes {
            match (next() % 3, live.is_empty()) {
                (0, false) => {
                    let k = live[(next() % live.len() as u64) as usize];
                    sql += &format!("UPDATE acct SET v = v + 1, note = md5(random()::text) WHERE id = {k};");
                }
                (1, false) => {
                    let k = live.swap_remove((next() % live.len() as u64) as usize);
                    sql += &format!("DELETE FROM acct WHERE id = {k};");
                }
                _ => {
                    next_key += 1;
                    live.push(next_key);
                    sql += &format!("INSERT INTO acct VALUES ({next_key}, {node}, 0, 'from {node}');");
                }
            }
            written.row_changes += 1;
        }
        sql += "COMMIT;";
        client.batch_execute(&sql).await?;
        written.txns += 1;
    }
    Ok(written)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_all_ways_converge_exactly_once() -> anyhow::Result<()> {
    let cluster = Cluster::start("three", &["r1", "r1", "r2"], SETUP, &["public.acct"]).await?;
    let services: Vec<_> = (0..3).map(|i| cluster.spawn("run", i)).collect::<Result<_, _>>()?;

    let mut writers = Vec::new();
    for i in 0..3 {
        let client = cluster.sql(i).await?;
        writers.push(tokio::spawn(writer(client, i as i64 + 1, 300, 0x9e37_79b9 + i as u64)));
    }
    let mut written = Vec::new();
    for w in writers {
        written.push(w.await??);
    }
    let (_, rows) = cluster.wait_converged("acct", Duration::from_secs(120)).await?;
    assert!(rows > 0);
    drop(services);

    // Every source transaction exactly once in the topics, whole, from its own origin only.
    let mut per_origin: HashMap<String, BTreeMap<u64, (u64, u64, i64, i64)>> = HashMap::new();
    for topic in [cluster.topic_of(0), cluster.topic_of(2)] {
        for m in read_topic(&cluster.endpoints.kafka, &topic)?
            .into_iter()
            .filter(|m| m.header("pgferry-kind") == Some("change"))
        {
            let origin = m.header("pgferry-origin").expect("origin header").to_string();
            let lsn: u64 = m.header("pgferry-commit-lsn").expect("lsn header").parse()?;
            let e = per_origin
                .entry(origin)
                .or_default()
                .entry(lsn)
                .or_insert((0, 0, i64::MAX, -1));
            e.0 += 1;
            if m.header("pgferry-txn-last") == Some("1") {
                e.1 += 1;
                e.3 = m.offset;
            }
            e.2 = e.2.min(m.offset);
        }
    }
    for (i, w) in written.iter().enumerate() {
        let name = &cluster.nodes[i].name;
        let txns = per_origin.get(name).cloned().unwrap_or_default();
        assert_eq!(txns.len() as u64, w.txns, "{name}: transactions in Kafka vs committed");
        assert_eq!(
            txns.values().map(|t| t.0).sum::<u64>(),
            w.row_changes,
            "{name}: row changes in Kafka"
        );
        for (lsn, (_events, lasts, first, last_offset)) in &txns {
            assert_eq!(*lasts, 1, "{name} txn {lsn}: one last-event marker");
            assert!(
                *last_offset >= *first,
                "{name} txn {lsn}: last marker on its final event"
            );
        }
    }
    assert_eq!(per_origin.len(), 3, "only the three origins produce (no loop)");

    // Each node applied each other origin exactly up to its last commit, in one place.
    for i in 0..3 {
        let c = cluster.sql(i).await?;
        for (j, origin) in cluster.nodes.iter().enumerate().filter(|(j, _)| *j != i) {
            let last = *per_origin[&origin.name].keys().last().expect("origin wrote");
            let row = c
                .query_one(
                    "SELECT (p.commit_lsn - '0/0')::text, (s.remote_lsn - '0/0')::text, count(*) OVER ()
                     FROM pgferry.apply_progress p
                     JOIN pg_replication_origin o ON o.roname = $2
                     JOIN pg_replication_origin_status s ON s.local_id = o.roident
                     WHERE p.origin = $1",
                    &[&origin.name, &cluster.origin_on(i, &origin.name)],
                )
                .await?;
            let progress: u64 = row.get::<_, String>(0).parse()?;
            let origin_lsn: u64 = row.get::<_, String>(1).parse()?;
            assert_eq!(progress, last, "node {i} progress for origin {j}");
            assert_eq!(origin_lsn, last, "node {i} replication origin for origin {j}");
            assert_eq!(row.get::<_, i64>(2), 1);
        }
    }
    cluster.cleanup().await
}
