//! What replicates, per table: a row filter and a column list (only matching rows and listed
//! columns reach the other nodes, and only those are in the topic), and a region-local table
//! (data residency): its rows stay on the nodes of its region and appear in no message of
//! another region's topic; and a table that replicates only inserts (its local updates and
//! deletes stay local).

use std::time::Duration;

use pgferry_integration_tests::{read_topic, wait_until, Cluster};

const SETUP: &str = "
CREATE TABLE filtered (region text, id int, secret text, note text, PRIMARY KEY (region, id));
CREATE TABLE eu_only (id int PRIMARY KEY, person text NOT NULL);
CREATE TABLE shared (id int PRIMARY KEY, v text);
CREATE TABLE journal (id int PRIMARY KEY, v text);";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_columns_and_residency() -> anyhow::Result<()> {
    let tables = ["public.filtered", "public.eu_only", "public.shared", "public.journal"];
    let mut cluster = Cluster::create("repsets", &["eu", "eu", "us"], SETUP, &tables).await?;
    cluster.replication_toml = "[replication.table.\"public.filtered\"]\n\
         row_filter = \"region = 'eu'\"\ncolumns = [\"region\", \"id\", \"note\"]\n\
         [replication.table.\"public.eu_only\"]\nregion = \"eu\"\n\
         [replication.table.\"public.journal\"]\noperations = [\"insert\"]\n"
        .into();
    cluster.write_config()?;
    cluster.init()?;
    let _services: Vec<_> = (0..3).map(|i| cluster.spawn("run", i)).collect::<Result<_, _>>()?;
    let (n1, n3) = (cluster.sql(0).await?, cluster.sql(2).await?);
    n1.batch_execute(
        "INSERT INTO filtered VALUES ('eu', 1, 'pw-one', 'a'), ('us', 2, 'pw-two', 'b'), ('eu', 3, 'pw-three', 'c');
         UPDATE filtered SET note = 'a2', secret = 'pw-four' WHERE id = 1;
         INSERT INTO eu_only VALUES (1, 'Ada (eu)'), (2, 'Bo (eu)');",
    )
    .await?;
    // Written on the us node: a local table there, published nowhere.
    n3.batch_execute("INSERT INTO eu_only VALUES (100, 'Cy (us, stays here)')").await?;
    n1.batch_execute(
        "INSERT INTO journal VALUES (1, 'one'), (2, 'two');
         UPDATE journal SET v = 'changed here' WHERE id = 1;
         DELETE FROM journal WHERE id = 2;",
    )
    .await?;
    n1.batch_execute("INSERT INTO shared VALUES (1, 'last')").await?;
    cluster.wait_converged("shared", Duration::from_secs(60)).await?;
    // The markers arrived everywhere, so everything before them has been applied.
    for i in 1..3 {
        let c = cluster.sql(i).await?;
        let rows = c.query("SELECT id, region, secret, note FROM filtered ORDER BY id", &[]).await?;
        let got: Vec<(i32, String, Option<String>, Option<String>)> =
            rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect();
        assert_eq!(
            got,
            vec![(1, "eu".into(), None, Some("a2".into())), (3, "eu".into(), None, Some("c".into()))],
            "node {}: only eu rows, without the unlisted column",
            i + 1
        );
    }
    for i in 1..3 {
        let rows = cluster.sql(i).await?.query("SELECT id, v FROM journal ORDER BY id", &[]).await?;
        let got: Vec<(i32, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        assert_eq!(
            got,
            vec![(1, "one".into()), (2, "two".into())],
            "node {}: the inserts arrived, n1's update and delete did not",
            i + 1
        );
    }
    let n2 = cluster.sql(1).await?;
    wait_until("the eu-local rows on the other eu node", Duration::from_secs(30), || async {
        Ok(n2.query_one("SELECT count(*) FROM eu_only", &[]).await?.get::<_, i64>(0) == 2)
    })
    .await?;
    let us_rows: Vec<i32> = n3.query("SELECT id FROM eu_only ORDER BY id", &[]).await?.iter().map(|r| r.get(0)).collect();
    assert_eq!(us_rows, vec![100], "the us node holds none of the eu-local rows");
    let n1_ids: Vec<i32> = n1.query("SELECT id FROM eu_only ORDER BY id", &[]).await?.iter().map(|r| r.get(0)).collect();
    assert_eq!(n1_ids, vec![1, 2], "the us node's own row never reached the eu nodes");

    // The topics: no message of the us topic concerns eu_only; no message anywhere carries
    // the unlisted column's values.
    let kafka = &cluster.endpoints.kafka;
    let us_topic = format!("{}.us.changes", cluster.name);
    let eu_topic = format!("{}.eu.changes", cluster.name);
    let us = read_topic(kafka, &us_topic)?;
    let eu = read_topic(kafka, &eu_topic)?;
    assert!(eu.iter().any(|m| contains(&m.value, b"Ada (eu)")), "the eu topic carries the eu-local rows");
    for m in &us {
        for needle in [&b"eu_only"[..], b"Ada", b"Bo (eu)", b"Cy (us"] {
            assert!(!contains(&m.value, needle) && !contains(&m.key, needle), "a us-topic message mentions {:?}", String::from_utf8_lossy(needle));
        }
    }
    for m in us.iter().chain(&eu) {
        assert!(!contains(&m.value, b"pw-"), "a message carries the unlisted column's value");
        assert!(!contains(&m.value, b"changed here"), "a message carries the insert-only table's update");
    }
    drop(_services);
    cluster.cleanup().await
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
