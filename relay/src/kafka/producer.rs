//! The settings every producer of the relay starts from.

use rdkafka::config::ClientConfig;

/// How long librdkafka waits before it sends a failed request again (its `retry.backoff.ms`).
pub const RETRY_BACKOFF_MS: &str = "1000";

/// The producer settings the relay sends every record with, before `message.max.bytes`, the
/// `[kafka]` settings and the record lifetime (the Kafka sink adds those). (`make bench` produces its
/// raw baseline with these too.)
pub fn producer_config(brokers: &str) -> ClientConfig {
    let mut producer = ClientConfig::new();
    producer
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        // a topic an event names is never created by asking for it (a writer chooses the name)
        .set("allow.auto.create.topics", "false")
        .set("linger.ms", "5");
    producer
}
