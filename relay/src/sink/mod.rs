//! Where events go: Kafka ([`kafka`]), partitioned like Java clients ([`partition`]).
pub mod kafka;
pub mod partition;
