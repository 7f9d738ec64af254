//! What the brokers say about a topic: its partition count.

use crate::error::{Kind, RelayError};
use rdkafka::client::{Client, ClientContext};
use rdkafka::error::RDKafkaErrorCode;
use std::time::Duration;

/// Number of partitions of `topic`, from a metadata request (blocking: run it off the runtime).
pub fn fetch_partition_count<C: ClientContext>(
    client: &Client<C>,
    topic: &str,
    timeout: Duration,
) -> Result<i32, RelayError> {
    let md = client
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| RelayError::transient(format!("metadata for topic {topic}")).caused_by(e))?;
    let t = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .ok_or_else(|| RelayError::transient(format!("topic {topic} not in metadata")))?;
    if let Some(err) = t.error() {
        // the topic does not exist, or may not be written: retrying helps only if someone acts
        let kind = match RDKafkaErrorCode::from(err) {
            RDKafkaErrorCode::UnknownTopicOrPartition
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::InvalidTopic => Kind::Event,
            _ => Kind::Transient,
        };
        return Err(RelayError::new(
            kind,
            format!(
                "topic {topic}: {}; create the topic (or enable auto-creation) or grant the relay access",
                RDKafkaErrorCode::from(err)
            ),
        ));
    }
    if t.partitions().is_empty() {
        return Err(RelayError::transient(format!(
            "topic {topic} has no partitions yet"
        )));
    }
    Ok(t.partitions().len() as i32)
}
