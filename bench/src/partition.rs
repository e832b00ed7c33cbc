//! Reading a node's partition back (`read_committed`): how far its committed change events
//! have got, and how many there are. Blocking (librdkafka); call through `block_in_place`.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// How many messages before the end of the partition [`PartitionProbe::last_change_commit_lsn`]
/// reads. After the last change only a few heartbeats follow, so a small tail is enough.
const TAIL: i64 = 64;

/// A `read_committed` reader of one partition.
pub struct PartitionProbe {
    consumer: BaseConsumer,
    topic: String,
    partition: i32,
}

impl PartitionProbe {
    /// A reader of `topic`/`partition` at `bootstrap`.
    pub fn new(bootstrap: &str, topic: &str, partition: i32) -> Result<PartitionProbe> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", format!("pgferry-bench-{}", std::process::id()))
            .set("isolation.level", "read_committed")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("fetch.wait.max.ms", "10")
            .create()
            .with_context(|| format!("creating a Kafka consumer for {bootstrap}"))?;
        Ok(PartitionProbe {
            consumer,
            topic: topic.to_string(),
            partition,
        })
    }

    fn assign(&self, offset: Offset) -> Result<()> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, self.partition, offset)?;
        self.consumer.assign(&tpl)?;
        Ok(())
    }

    /// Reads from `offset` to the end of what is committed (or until `limit` passes without
    /// reaching it), calling `each` on every message.
    fn scan(&self, offset: Offset, limit: Duration, mut each: impl FnMut(&BorrowedMessage<'_>)) -> Result<bool> {
        self.assign(offset)?;
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            match self.consumer.poll(Duration::from_millis(100)) {
                None => {}
                Some(Err(KafkaError::PartitionEOF(_))) => return Ok(true),
                Some(Err(e)) => return Err(anyhow!("reading {}/{}: {e}", self.topic, self.partition)),
                Some(Ok(m)) => each(&m),
            }
        }
        Ok(false)
    }

    /// The `pgferry-commit-lsn` of the last committed change event near the end of the
    /// partition, if any. `None` also while the end is an open (uncommitted) transaction.
    pub fn last_change_commit_lsn(&self) -> Result<Option<u64>> {
        let (low, high) = self
            .consumer
            .fetch_watermarks(&self.topic, self.partition, Duration::from_secs(10))
            .with_context(|| format!("reading the watermarks of {}/{}", self.topic, self.partition))?;
        if high <= low {
            return Ok(None);
        }
        let mut last = None;
        self.scan(Offset::Offset((high - TAIL).max(low)), Duration::from_secs(1), |m| {
            if header(m, "pgferry-kind") == Some("change") {
                if let Some(lsn) = header(m, "pgferry-commit-lsn").and_then(|v| v.parse::<u64>().ok()) {
                    last = Some(lsn);
                }
            }
        })?;
        Ok(last)
    }

    /// Counts the committed change events of the whole partition.
    pub fn count_changes(&self, limit: Duration) -> Result<u64> {
        let mut n = 0u64;
        let done = self.scan(Offset::Beginning, limit, |m| {
            if header(m, "pgferry-kind") == Some("change") {
                n += 1;
            }
        })?;
        if !done {
            bail!(
                "counting {}/{}: not at the end after {limit:?} ({n} change events so far)",
                self.topic,
                self.partition
            );
        }
        Ok(n)
    }
}

fn header<'a>(m: &'a BorrowedMessage<'_>, name: &str) -> Option<&'a str> {
    m.headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}
