//! Whether the brokers answer, for `check`: with the broker's own reason when it refuses the
//! relay (authentication, TLS) rather than librdkafka's "transport failure".

use super::blocking::off_runtime;
use super::config::KafkaConfig;
use crate::error::RelayError;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, DeliveryResult, Producer, ProducerContext};
use std::time::Duration;

/// Asks the brokers for metadata: the number of brokers, or the reason they refused the relay;
/// an error when they did not answer at all.
pub async fn reachable(config: &KafkaConfig) -> Result<Result<usize, String>, RelayError> {
    let cc = config.client_config();
    off_runtime("metadata task", move || {
        let producer: BaseProducer<Refusals> = cc.create_with_context(Refusals::default())?;
        let md = producer
            .client()
            .fetch_metadata(None, Duration::from_secs(5));
        // errors reach the context only when the producer's queue is served
        producer.poll(Duration::from_millis(100));
        let refused = producer.context().first();
        match (md, refused) {
            (Ok(md), _) => Ok(Ok(md.brokers().len())),
            // the broker's own reason says more than "transport failure"
            (Err(_), Some(reason)) => Ok(Err(reason)),
            (Err(e), None) => Err(e.into()),
        }
    })
    .await
}

/// Keeps the first authentication or TLS refusal librdkafka reports (a failed metadata request
/// says only "transport failure"); the rest of its chatter is dropped, as `check` prints findings.
#[derive(Default)]
struct Refusals(std::sync::Mutex<Option<String>>);

impl Refusals {
    fn first(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl ClientContext for Refusals {
    fn log(&self, _: RDKafkaLogLevel, _: &str, _: &str) {}

    fn error(&self, error: KafkaError, reason: &str) {
        let what = match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::Authentication) => "authentication failed",
            Some(RDKafkaErrorCode::SSL) => "TLS failed",
            _ if reason.contains("SASL") => "authentication failed",
            _ if reason.contains("SSL") => "TLS failed",
            _ => return,
        };
        let mut first = self.0.lock().unwrap_or_else(|e| e.into_inner());
        first.get_or_insert_with(|| format!("{what}: {reason}"));
    }
}

impl ProducerContext for Refusals {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &DeliveryResult<'_>, _: ()) {}
}
