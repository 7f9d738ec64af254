//! pg_outbox relay: reads committed pg_outbox events from a logical replication slot (or the outbox
//! table), in commit order, and publishes them to Kafka exactly once; and ingests Kafka topics into
//! a consumer's inbox.
//!
//! - [`source`]: where events come from, behind the [`source::Source`] seam ([`source::wal`],
//!   [`source::poll`])
//! - [`relay`]: the wiring: the configured source, the Kafka sink and the dead letters, session
//!   after session
//! - [`pipeline`]: the one loop, for any source, sink and dead letters: route, dedup, send,
//!   acknowledge, confirm, drain
//! - [`checkpoint`]: which source position may be confirmed (a fully acknowledged prefix)
//! - [`sink`]: where events go, behind the [`sink::Sink`] seam ([`sink::kafka`]), the restart
//!   dedup ([`sink::dedup`]) and the partitioner ([`sink::partition`])
//! - [`deadletter`]: events that can never be published, kept with their reason
//! - [`event`]: positions and what a source hands over
//! - [`ingest`]: the consumer side, Kafka -> `inbox.messages` + `inbox.offsets`
//! - [`postgres`], [`kafka`]: the client plumbing (connection settings, TLS, sessions; librdkafka
//!   settings, metadata, headers), which knows nothing of the loop
//! - [`config`]: the command line, the environment and the file, layered and validated once
//! - [`error`], [`retry`]; [`ops`]: `check`, `status` and `healthcheck`; [`telemetry`]: logs and
//!   metrics; [`notify`]: systemd's readiness protocol; [`shutdown`]: signals

pub mod checkpoint;
pub mod config;
pub mod deadletter;
pub mod error;
pub mod event;
pub mod fence;
pub mod ingest;
pub mod kafka;
pub mod notify;
pub mod ops;
pub mod pipeline;
pub mod postgres;
pub mod relay;
pub mod retry;
pub mod shutdown;
pub mod sink;
pub mod source;
pub mod telemetry;

use config::{Cli, Config, Job, Mode};
use std::process::ExitCode;
use std::sync::Arc;

/// Runs a parsed command line; the binary is a thin wrapper around this. The exit status says what
/// to do next ([`error::RelayError::exit_code`]): 0 done, 1 a failure, 2 a configuration error, 3 an
/// operator must act.
pub async fn main(cli: Cli) -> ExitCode {
    let (mode, settings, json) = match cli.command.into_job() {
        Job::Relay(mode, settings, json) => (mode, settings, json),
        Job::Healthcheck(h) => return ops::healthcheck(&h).await,
    };
    let config = match settings.resolve(mode) {
        Ok(c) => c,
        Err(e) => {
            if json {
                println!("{}", serde_json::json!({ "error": e.to_string() }));
            }
            eprintln!("pg-outbox-relay: {e}");
            return ExitCode::from(e.exit_code());
        }
    };
    match mode {
        Mode::Check => {
            warn_to_stderr(&config);
            ops::print_check(&config, json).await
        }
        Mode::Status => {
            warn_to_stderr(&config);
            ops::print_status(&config, json).await
        }
        Mode::Run | Mode::Ingest => serve(&config, mode).await,
    }
}

/// `check` and `status` log nothing: what the settings leave unapplied goes to stderr.
fn warn_to_stderr(config: &Config) {
    for w in &config.warnings {
        eprintln!("pg-outbox-relay: warning: {w}");
    }
}

/// `run` or `ingest`: logs, signals, metrics, then the long-running loop.
async fn serve(config: &Config, mode: Mode) -> ExitCode {
    telemetry::init_logging(config.telemetry.log_json);
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let shutdown = match shutdown::on_signals() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("pg-outbox-relay: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let metrics = Arc::new(telemetry::Metrics::default());
    match &config.ingest {
        Some(ingest) => metrics.describe("ingest", &ingest.consumer),
        None => metrics.describe("run", &config.source.source_id),
    }
    // systemd's Type=notify (NOTIFY_SOCKET): READY=1 once streaming or standing by, STATUS= lines
    let notify = notify::Notifier::from_env();
    let active = if mode == Mode::Ingest {
        "ingesting"
    } else {
        "streaming"
    };
    notify.watch(
        metrics.clone(),
        shutdown.clone(),
        config.telemetry.stall_timeout,
        active,
    );
    if let Some(addr) = config.telemetry.metrics_addr.clone() {
        let (m, t) = (metrics.clone(), shutdown.clone());
        let stall = config.telemetry.stall_timeout;
        tokio::spawn(async move {
            if let Err(e) = telemetry::serve(addr, m, t, stall).await {
                tracing::error!(error = %e, "metrics endpoint failed");
            }
        });
        if mode == Mode::Run {
            // the source's figures in the database, on a session of their own
            let (c, m, t) = (config.clone(), metrics.clone(), shutdown.clone());
            tokio::spawn(telemetry::database::sample_source(c, m, t));
        }
    }
    let result = match (mode, &config.ingest) {
        (Mode::Ingest, Some(ingest)) => ingest::run(config, ingest, shutdown, metrics).await,
        _ => relay::run(config, shutdown, metrics).await,
    };
    notify.stopping();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = e.exit_code();
            if code == error::OPERATOR_MUST_ACT {
                tracing::error!(error = %e, exit = code, "relay stopped: an operator must act (restarting will not help)");
            } else {
                tracing::error!(error = %e, exit = code, "relay stopped");
            }
            ExitCode::from(code)
        }
    }
}
