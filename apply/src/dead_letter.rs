//! The dead-letter path: a message apply can never use is produced, whole and with its
//! headers, to `<cluster>.dlq` with the reason and where it was read, and recorded in
//! `pgferry.exceptions` (inside the open transaction, if any), so nothing is lost and it can be
//! replayed after a fix. Delivery is awaited before the stream moves on; a message may be
//! dead-lettered twice if the transaction around it is retried (at least once).

use std::time::Duration;

use pgferry_connectors::config::KafkaConfig;
use pgferry_connectors::kafka::{
    header, read_committed_config, KafkaError, HEADER_COMMIT_LSN, HEADER_DLQ_NODE, HEADER_DLQ_REASON, HEADER_DLQ_SOURCE,
    HEADER_ORIGIN,
};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};
use pgferry_connectors::postgres::PgSession;
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::error::ApplyError;

/// The dead-letter topic of a cluster and a producer for it.
pub struct DeadLetters {
    /// Producer (idempotent, not transactional).
    pub producer: FutureProducer,
    /// `<cluster>.dlq`.
    pub topic: String,
    /// The node that gives up on the messages.
    pub node: String,
}

impl DeadLetters {
    /// The dead-letter topic of `config`'s cluster, for messages node `node` gives up on.
    pub fn new(config: &pgferry_connectors::config::Config, node: &str) -> Result<DeadLetters, KafkaError> {
        Ok(DeadLetters {
            producer: pgferry_connectors::kafka::plain_producer(&config.kafka)?,
            topic: format!("{}.dlq", config.cluster.name),
            node: node.to_string(),
        })
    }

    /// Sends `msg` to the dead-letter topic and records it in `pgferry.exceptions`.
    pub async fn send(&self, sql: &PgSession, msg: &BorrowedMessage<'_>, reason: &str) -> Result<(), ApplyError> {
        let source = format!("{}/{}@{}", msg.topic(), msg.partition(), msg.offset());
        let mut headers = OwnedHeaders::new();
        if let Some(h) = msg.headers() {
            for h in h.iter() {
                headers = headers.insert(Header { key: h.key, value: h.value });
            }
        }
        let headers = headers
            .insert(Header {
                key: HEADER_DLQ_REASON,
                value: Some(reason),
            })
            .insert(Header {
                key: HEADER_DLQ_SOURCE,
                value: Some(source.as_str()),
            })
            .insert(Header {
                key: HEADER_DLQ_NODE,
                value: Some(self.node.as_str()),
            });
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic).headers(headers);
        if let Some(k) = msg.key() {
            record = record.key(k);
        }
        if let Some(p) = msg.payload() {
            record = record.payload(p);
        }
        self.producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| KafkaError::Topic {
                topic: self.topic.clone(),
                message: format!("dead-lettering {source}: {e}"),
            })?;
        let origin = header(msg, HEADER_ORIGIN);
        let (topic, partition, offset) = (msg.topic(), msg.partition(), msg.offset());
        sql.client
            .execute(
                "INSERT INTO pgferry.exceptions (origin, topic, partition, kafka_offset, reason, key, payload)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[&origin, &topic, &partition, &offset, &reason, &msg.key(), &msg.payload()],
            )
            .await
            .map_err(sql.err("recording pgferry.exceptions"))?;
        Ok(())
    }

    /// Re-reads `upto`'s partition from offset `from` up to `upto` (not included) and sends
    /// every message of `upto`'s source transaction there to the dead-letter topic: the part of a
    /// skipped transaction that was already consumed. Returns how many it sent.
    pub async fn send_range(
        &self,
        kafka: &KafkaConfig,
        sql: &PgSession,
        upto: &BorrowedMessage<'_>,
        from: i64,
        reason: &str,
    ) -> Result<u64, ApplyError> {
        let (topic, partition, until) = (upto.topic(), upto.partition(), upto.offset());
        let txn = (header(upto, HEADER_ORIGIN), header(upto, HEADER_COMMIT_LSN));
        let what = format!("re-reading {topic}/{partition} offsets {from}..{until} of a skipped transaction");
        let kafka_err = |message: String| KafkaError::Topic {
            topic: topic.to_string(),
            message: format!("{what}: {message}"),
        };
        let consumer: StreamConsumer = read_committed_config(kafka, &format!("pgferry-{}-dlq-reread", self.node))
            .create()
            .map_err(|e| kafka_err(e.to_string()))?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(from))
            .map_err(|e| kafka_err(e.to_string()))?;
        consumer.assign(&tpl).map_err(|e| kafka_err(e.to_string()))?;
        let mut sent = 0;
        loop {
            let m = tokio::time::timeout(Duration::from_secs(60), consumer.recv())
                .await
                .map_err(|_| kafka_err("no message within 60 s".into()))?
                .map_err(|e| kafka_err(e.to_string()))?;
            if m.offset() >= until {
                return Ok(sent);
            }
            if (header(&m, HEADER_ORIGIN), header(&m, HEADER_COMMIT_LSN)) == txn {
                self.send(sql, &m, reason).await?;
                sent += 1;
            }
            if m.offset() + 1 == until {
                return Ok(sent);
            }
        }
    }
}
