//! Issue 16, scenario 12: resolvers other than last-update-wins. n1 inserts a row, n3 applies it
//! and later updates it (and deletes another row it saw). On n1 and n2 the row was last written
//! by n1, the change comes from n3, so the old code called it `update_origin_differs` /
//! `delete_origin_differs`: `first_update_wins` and `keep_local` kept n1's old row on n1 and n2
//! for good (n3 kept its own), `manual` parked every such change, `error` stopped n3's stream.
//! Rule: an update or delete whose before image (REPLICA IDENTITY FULL) equals the local row,
//! and which is dated after it, was made on top of that very version: it is not a conflict, it
//! is applied and nothing is recorded.
//!
//! Both apply paths: the tables without a secondary unique key are grouped (the group is cut
//! before such a change and it goes one by one), `fuw_u` (a unique column) is never grouped.

use std::time::Duration;

use pgferry_integration_tests::{wait_until, Cluster};

/// (table, resolver).
const TABLES: [(&str, &str); 5] = [
    ("fuw", "first_update_wins"),
    ("kl", "keep_local"),
    ("man", "manual"),
    ("err", "error"),
    ("fuw_u", "first_update_wins"),
];

fn setup() -> String {
    let mut sql: String = TABLES
        .iter()
        .map(|(t, _)| {
            let unique = if *t == "fuw_u" { ", u text UNIQUE" } else { "" };
            format!("CREATE TABLE {t} (id int PRIMARY KEY, v text{unique}); ALTER TABLE {t} REPLICA IDENTITY FULL;")
        })
        .collect();
    sql += "CREATE TABLE marker (id int PRIMARY KEY);";
    sql
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolvers_before_image_equal_to_local_row_is_not_a_conflict() -> anyhow::Result<()> {
    let mut tables: Vec<String> = TABLES.iter().map(|(t, _)| format!("public.{t}")).collect();
    tables.push("public.marker".into());
    let refs: Vec<&str> = tables.iter().map(String::as_str).collect();
    let mut cluster = Cluster::create("resolvbefore", &["r1", "r1", "r1"], &setup(), &refs).await?;
    cluster.replication_toml = TABLES
        .iter()
        .map(|(t, r)| format!("[replication.table.\"public.{t}\"]\nresolver = \"{r}\"\n"))
        .collect();
    cluster.write_config()?;
    cluster.init()?;
    let (n1, n3) = (cluster.sql(0).await?, cluster.sql(2).await?);
    let _services: Vec<_> = (0..3).map(|i| cluster.spawn("run", i)).collect::<Result<_, _>>()?;

    for (t, _) in TABLES {
        let cols = if t == "fuw_u" { "(1, 'n1', 'a'), (2, 'n1', 'b')" } else { "(1, 'n1'), (2, 'n1')" };
        n1.batch_execute(&format!("INSERT INTO {t} VALUES {cols}")).await?;
    }
    for (t, _) in TABLES {
        cluster.wait_converged(t, Duration::from_secs(60)).await?;
    }
    // n3 changes what it saw: each its own transaction.
    for (t, _) in TABLES {
        n3.batch_execute(&format!("UPDATE {t} SET v = 'n3' WHERE id = 1")).await?;
        n3.batch_execute(&format!("DELETE FROM {t} WHERE id = 2")).await?;
    }
    n3.batch_execute("INSERT INTO marker VALUES (3)").await?;
    for i in [0, 1] {
        let c = cluster.sql(i).await?;
        wait_until(&format!("n3's marker on node {}", i + 1), Duration::from_secs(60), || async {
            Ok(c.query_opt("SELECT 1 FROM marker WHERE id = 3", &[]).await?.is_some())
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e} (the `error` resolver stopped n3's stream?)\n{}", cluster.logs()))?;
    }
    for i in 0..3 {
        let c = cluster.sql(i).await?;
        for (t, resolver) in TABLES {
            let rows: Vec<(i32, Option<String>)> = c
                .query(&format!("SELECT id, v FROM {t} ORDER BY id"), &[])
                .await?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            assert_eq!(rows, vec![(1, Some("n3".to_string()))], "{t} ({resolver}) on node {}", i + 1);
        }
        let recorded: Vec<(String, String, String)> = c
            .query(
                "SELECT tbl, conflict_type, resolution FROM pgferry.conflicts WHERE tbl <> 'public.marker' ORDER BY id",
                &[],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        assert!(recorded.is_empty(), "node {}: no conflict recorded or parked: {recorded:?}", i + 1);
    }
    for (t, _) in TABLES {
        cluster.wait_converged(t, Duration::from_secs(30)).await?;
    }
    drop(_services);
    cluster.cleanup().await
}
