//! Large rows back to back: the walsender sends pgoutput messages of about 1 MB each, faster than
//! capture reads them, so the replication socket's receive buffer fills and the walsender waits
//! for capture to read. pg_walstream 0.8.1 (libpq backend) could then stop reading for good:
//! after a `PQconsumeInput` that did not empty the socket it cleared the socket's readiness, and
//! with the walsender blocked no new data came to set it again. Capture hung without a word
//! until the walsender's `wal_sender_timeout`, and even then (the walsender's close waits behind
//! the data capture never read). Every row must arrive, in order, once.
//!
//! The hang needs the walsender to stop at a message boundary where libpq's one read leaves data
//! in the socket: timing this test does not force. It was seen in `capture_event_too_large`
//! under load (the socket held 111,616 unread bytes, capture idle) and is fixed in
//! `vendor/pg_walstream` (vendor/README.md); this test keeps large messages covered end to end.

use std::time::Duration;

use anyhow::Result;
use pgferry_integration_tests::Cluster;

const SETUP: &str = "
CREATE TABLE big (id int PRIMARY KEY, body text);
CREATE PROCEDURE fill(rows int, kb int) LANGUAGE plpgsql AS $$
BEGIN
  FOR i IN 1..rows LOOP
    INSERT INTO big SELECT i, string_agg(md5(random()::text || g), '') FROM generate_series(1, kb * 32) g;
    COMMIT;
  END LOOP;
END $$;";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_of_a_megabyte_back_to_back_all_arrive() -> Result<()> {
    let cluster = Cluster::start("largerows", &["r1", "r1"], SETUP, &["public.big"]).await?;
    // Written before capture starts: the walsender then has the whole backlog to send at once.
    cluster.sql(0).await?.batch_execute("CALL fill(60, 1024)").await?;
    let _capture = cluster.spawn("capture", 0)?;
    let _apply = cluster.spawn("apply", 1)?;
    let (_, rows) = cluster.wait_converged("big", Duration::from_secs(240)).await.map_err(|e| {
        anyhow::anyhow!("{e}\n{}", cluster.logs())
    })?;
    assert_eq!(rows, 60, "every row arrives once");
    drop((_capture, _apply));
    cluster.cleanup().await
}

