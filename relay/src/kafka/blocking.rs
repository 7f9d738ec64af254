//! librdkafka calls that block (metadata, flush, a consumer's poll) run on tokio's blocking pool,
//! never on a runtime thread.

use crate::error::RelayError;

/// Runs a blocking librdkafka call on the blocking pool.
pub async fn off_runtime<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> Result<T, RelayError> + Send + 'static,
) -> Result<T, RelayError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RelayError::transient(what).caused_by(e))?
}
