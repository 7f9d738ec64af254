//! What the relay tells librdkafka and how it names Kafka topics: the brokers, the operator's
//! librdkafka settings (passed through as a string map, over our defaults), the record lifetime,
//! topic routing and the record limits. Values are checked once, when the configuration is loaded.

use super::producer::RETRY_BACKOFF_MS;
use crate::error::RelayError;
use rdkafka::config::ClientConfig;
use std::collections::BTreeMap;
use std::time::Duration;

/// Which time a Kafka record carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordTimestamp {
    /// When the event was enqueued: a backlog older than the topic's retention is deleted by the
    /// broker soon after it is published.
    Enqueue,
    /// When the relay sends it.
    Publish,
}

/// How a record presents its event to consumers, beyond the relay's own `pg_outbox-*` headers
/// (which every record carries: the restart dedup reads them back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordFormat {
    /// The relay's headers, a `content-type`, then the event's headers.
    PgOutbox,
    /// CloudEvents 1.0, Kafka protocol binding, binary content mode: `ce_specversion`, `ce_id`
    /// (the event id), `ce_source` (the source identity), `ce_type` (the event's `ce_type` header,
    /// else the topic), `ce_time` (the enqueue time) and `content-type`.
    CloudEvents,
    /// Debezium's outbox event router, with its defaults: the event id in the header `id`, the
    /// key as the record key (its `aggregateid`), the payload as the value.
    Debezium,
}

#[derive(Debug, Clone)]
pub struct KafkaConfig {
    pub brokers: String,
    /// The life of a record in the producer (librdkafka's message.timeout.ms).
    pub fence_timeout: Duration,
    pub topic_template: String,
    pub max_record_bytes: usize,
    pub record_timestamp: RecordTimestamp,
    pub record_format: RecordFormat,
    /// How often the partition counts of the topics written to are asked again.
    pub partition_check: Duration,
    /// librdkafka settings given by the operator, applied over ours.
    pub settings: BTreeMap<String, String>,
    /// Topics the source may publish to (names, or prefixes ending in `*`); empty: any.
    pub allowed_topics: Vec<String>,
}

/// Refuses operator librdkafka settings that would break what the relay relies on: the
/// exactly-once guarantee (idempotence, acks), the fence of a paused relay (the record lifetime,
/// the retry backoff) and dead-lettering of oversized records (`message.max.bytes`).
pub fn check_settings(
    settings: &BTreeMap<String, String>,
    max_record_bytes: usize,
) -> Result<(), RelayError> {
    // the restart dedup relies on per-partition order through retries: keep these as they are
    for (key, required) in [("enable.idempotence", "true"), ("acks", "all")] {
        if settings
            .get(key)
            .is_some_and(|v| v != required && !(key == "acks" && v == "-1"))
        {
            return Err(RelayError::config(format!(
                "kafka setting {key} must stay {required}: the exactly-once guarantee depends on it"
            )));
        }
    }
    // the record lifetime is fence_timeout_ms, with the gapless guarantee (see fence.rs)
    for key in ["message.timeout.ms", "delivery.timeout.ms"] {
        if settings.contains_key(key) {
            return Err(RelayError::config(format!(
                "kafka setting {key} is the relay's own: set fence_timeout_ms instead (the life of a \
                 record, which the takeover of a paused relay waits out)"
            )));
        }
    }
    for key in ["retry.backoff.ms", "retry.backoff.max.ms"] {
        if settings.contains_key(key) {
            return Err(RelayError::config(format!(
                "kafka setting {key} is the relay's own ({} ms): the fence of a paused relay \
                 relies on it (docs/guarantees.md, \"A paused relay is fenced\")",
                RETRY_BACKOFF_MS
            )));
        }
    }
    if let Some(limit) = settings.get("message.max.bytes") {
        if limit
            .parse::<usize>()
            .map_or(true, |l| l < max_record_bytes)
        {
            return Err(RelayError::config(format!(
                "kafka setting message.max.bytes ({limit}) is below max_record_bytes ({max_record_bytes}): \
                 such records would fail over and over instead of being dead-lettered"
            )));
        }
    }
    Ok(())
}

impl KafkaConfig {
    /// Whether `allowed_topics` lets the source publish to Kafka topic `topic`.
    pub fn allows(&self, topic: &str) -> bool {
        self.allowed_topics.is_empty()
            || self
                .allowed_topics
                .iter()
                .any(|rule| match rule.strip_suffix('*') {
                    Some(prefix) => topic.starts_with(prefix),
                    None => topic == rule,
                })
    }

    /// The Kafka topic an event with `topic` is published to.
    pub fn topic_for<'t>(&self, topic: &'t str) -> std::borrow::Cow<'t, str> {
        if self.topic_template == "{topic}" {
            std::borrow::Cow::Borrowed(topic)
        } else {
            std::borrow::Cow::Owned(self.topic_template.replace("{topic}", topic))
        }
    }

    /// A client for reading (consumers, metadata): the brokers plus the operator's connection and
    /// security settings; producer-only settings would only make librdkafka warn.
    pub fn client_config(&self) -> ClientConfig {
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", &self.brokers);
        for (k, v) in &self.settings {
            if k.starts_with("security.") || k.starts_with("sasl.") || k.starts_with("ssl.") {
                cc.set(k, v);
            }
        }
        cc
    }
}
