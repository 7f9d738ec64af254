//! Kafka client plumbing, used by the sink, ingest and `check`: the settings the relay gives
//! librdkafka and how it names topics ([`config`]), the producer defaults ([`producer`]), metadata
//! and topic ids ([`metadata`], [`topic_id`]), headers of records other producers wrote
//! ([`headers`]), blocking librdkafka calls off the runtime ([`blocking`]) and the reachability
//! probe ([`probe`]). Nothing here knows the relay's loop, sources or sinks.

pub mod blocking;
pub mod config;
pub mod headers;
pub mod metadata;
pub mod probe;
pub mod producer;
pub mod topic_id;

pub use blocking::off_runtime;
pub use config::{check_settings, KafkaConfig, RecordFormat, RecordTimestamp};
pub use headers::raw_headers;
pub use metadata::fetch_partition_count;
pub use producer::{producer_config, RETRY_BACKOFF_MS};
pub use topic_id::fetch_topic_id;
