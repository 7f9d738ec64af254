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
//! - [`error`], [`retry`]; [`ops`]: `check` and `status`; [`telemetry`]: logs and metrics;
//!   [`shutdown`]: signals

pub mod checkpoint;
pub mod config;
pub mod deadletter;
pub mod error;
pub mod event;
pub mod fence;
pub mod ingest;
pub mod kafka;
pub mod ops;
pub mod pipeline;
pub mod postgres;
pub mod relay;
pub mod retry;
pub mod shutdown;
pub mod sink;
pub mod source;
pub mod telemetry;

use config::{Cli, Config, Mode};
use std::process::ExitCode;
use std::sync::Arc;

/// Runs a parsed command line; the binary is a thin wrapper around this.
pub async fn main(cli: Cli) -> ExitCode {
    let (mode, settings) = cli.command.into_parts();
    let config = match settings.resolve(mode) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pg-outbox-relay: {e}");
            return ExitCode::from(2);
        }
    };
    match mode {
        Mode::Check => check(&config).await,
        Mode::Status => status(&config).await,
        Mode::Run | Mode::Ingest => serve(&config, mode).await,
    }
}

async fn check(config: &Config) -> ExitCode {
    let findings = ops::check(config).await;
    let mut ok = true;
    for f in &findings {
        if f.ok {
            println!("ok    {}", f.what);
        } else {
            ok = false;
            println!("FAIL  {}\n      fix: {}", f.what, f.fix);
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn status(config: &Config) -> ExitCode {
    match ops::status(config).await {
        Ok(lines) => {
            for (k, v) in lines {
                println!("{k:<32}{v}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pg-outbox-relay: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `run` or `ingest`: logs, signals, metrics, then the long-running loop.
async fn serve(config: &Config, mode: Mode) -> ExitCode {
    telemetry::init_logging(config.telemetry.log_json);
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
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "relay stopped");
            ExitCode::FAILURE
        }
    }
}
