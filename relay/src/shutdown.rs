//! One cancellation token for the whole process, cancelled by SIGTERM or SIGINT. Every loop selects
//! on it; the relay then flushes Kafka, confirms the last acknowledged position and exits 0.

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::info;

pub fn on_signals() -> std::io::Result<CancellationToken> {
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let t = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received"),
            _ = int.recv() => info!("SIGINT received"),
        }
        t.cancel();
    });
    Ok(token)
}
