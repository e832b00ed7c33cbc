//! The dead-letter path: a message apply can never use is produced, whole and with its
//! headers, to `<cluster>.dlq` with the reason and where it was read, and recorded in
//! `pgferry.exceptions` (inside the open transaction, if any), so nothing is lost and it can be
//! replayed after a fix. Delivery is awaited before the stream moves on; a message may be
//! dead-lettered twice if the transaction around it is retried (at least once).

use std::time::Duration;

use pgferry_connectors::kafka::{KafkaError, HEADER_DLQ_NODE, HEADER_DLQ_REASON, HEADER_DLQ_SOURCE, HEADER_ORIGIN};
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
        let origin = msg.headers().and_then(|h| {
            h.iter()
                .find(|h| h.key == HEADER_ORIGIN)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        });
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
}
