//! Kafka's topic id (KIP-516): a topic deleted and created again under the same name gets a new
//! one, which is how the ingest tells that its stored offsets belong to another topic. rdkafka has
//! no safe call for it, so this asks librdkafka's DescribeTopics directly.

use crate::error::RelayError;
use rdkafka::bindings as rd;
use rdkafka::client::{Client, ClientContext};
use rdkafka::types::RDKafkaRespErr;
use std::ffi::{CStr, CString};
use std::time::Duration;

/// What brokers that know no topic ids (before Kafka 2.8) answer, in base64.
const ZERO_ID: &str = "AAAAAAAAAAAAAAAAAAAAAA";

/// The id of `topic` in base64 (as Kafka's tools print it), or None when the broker gives none.
/// Blocking: run it off the runtime.
pub fn fetch_topic_id<C: ClientContext>(
    client: &Client<C>,
    topic: &str,
    timeout: Duration,
) -> Result<Option<String>, RelayError> {
    let name = CString::new(topic)
        .map_err(|_| RelayError::config(format!("topic {topic:?} contains a NUL byte")))?;
    let mut names = [name.as_ptr()];
    let rk = client.native_ptr();
    let wait = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: every librdkafka object made here is destroyed here, after its last use; the names
    // outlive the collection, which librdkafka copies them into; `rk` lives as long as `client`.
    unsafe {
        let queue = rd::rd_kafka_queue_new(rk);
        let topics = rd::rd_kafka_TopicCollection_of_topic_names(names.as_mut_ptr(), 1);
        rd::rd_kafka_DescribeTopics(rk, topics, std::ptr::null(), queue);
        rd::rd_kafka_TopicCollection_destroy(topics);
        let event = rd::rd_kafka_queue_poll(queue, wait);
        let id = read_id(event, topic);
        if !event.is_null() {
            rd::rd_kafka_event_destroy(event);
        }
        rd::rd_kafka_queue_destroy(queue);
        id
    }
}

/// The topic id in a DescribeTopics result event.
///
/// # Safety
/// `event` is null or a live event returned by `rd_kafka_queue_poll`.
unsafe fn read_id(
    event: *mut rd::rd_kafka_event_t,
    topic: &str,
) -> Result<Option<String>, RelayError> {
    // SAFETY: as the function says; the pointers read come from `event` and live as long as it
    unsafe {
        let failed =
            |what: String| RelayError::transient(format!("describing topic {topic}: {what}"));
        if event.is_null() {
            return Err(failed("no answer in time".into()));
        }
        let code = rd::rd_kafka_event_error(event);
        if code != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR {
            if unsupported(code) {
                return Ok(None);
            }
            return Err(failed(text(rd::rd_kafka_event_error_string(event))));
        }
        let result = rd::rd_kafka_event_DescribeTopics_result(event);
        if result.is_null() {
            return Err(failed("not a DescribeTopics result".into()));
        }
        let mut count = 0usize;
        let descriptions = rd::rd_kafka_DescribeTopics_result_topics(result, &mut count);
        if descriptions.is_null() || count == 0 {
            return Ok(None);
        }
        let description = *descriptions;
        let error = rd::rd_kafka_TopicDescription_error(description);
        if !error.is_null() {
            let code = rd::rd_kafka_error_code(error);
            if code != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR {
                if unsupported(code) {
                    return Ok(None);
                }
                return Err(failed(text(rd::rd_kafka_error_string(error))));
            }
        }
        let id = rd::rd_kafka_TopicDescription_topic_id(description);
        if id.is_null() {
            return Ok(None);
        }
        let id = text(rd::rd_kafka_Uuid_base64str(id));
        Ok((id != ZERO_ID && !id.is_empty()).then_some(id))
    }
}

fn unsupported(code: RDKafkaRespErr) -> bool {
    matches!(
        code,
        RDKafkaRespErr::RD_KAFKA_RESP_ERR__UNSUPPORTED_FEATURE
            | RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNSUPPORTED_VERSION
    )
}

/// # Safety
/// `s` is null or a NUL-terminated string that lives while this runs.
unsafe fn text(s: *const std::os::raw::c_char) -> String {
    // SAFETY: as the function says
    unsafe {
        if s.is_null() {
            return String::new();
        }
        CStr::from_ptr(s).to_string_lossy().into_owned()
    }
}
