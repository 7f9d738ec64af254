//! pg_outbox relay: reads committed pg_outbox events from a logical replication slot, in commit
//! order, and publishes them to Kafka exactly once.
//!
//! - [`source`]: the slot stream ([`source::wal`]) or the outbox table ([`source::poll`])
//! - [`pipeline`]: sessions, reconnects, publishing with the restart dedup, dead letters
//! - [`sink`]: the Kafka producer and partitioner ([`sink::kafka`])
//! - `checkpoint`: which LSN may be confirmed ([`checkpoint`])
//! - [`ingest`]: the consumer side, Kafka -> `inbox.messages` + `inbox.offsets`
//! - `ops`: `check` and `status`; `telemetry`: logs and metrics; `shutdown`: signals

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod ingest;
pub mod ops;
pub mod pipeline;
pub mod shutdown;
pub mod sink;
pub mod source;
pub mod telemetry;

use config::{Cli, Command};
use std::process::ExitCode;
use std::sync::Arc;

/// Runs a parsed command line; the binary is a thin wrapper around this.
pub async fn main(cli: Cli) -> ExitCode {
    let (settings, command) = match cli.command {
        Command::Run(s) => (s, "run"),
        Command::Check(s) => (s, "check"),
        Command::Status(s) => (s, "status"),
        Command::Ingest(s) => (s, "ingest"),
    };
    let config = match settings.resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pg-outbox-relay: {e}");
            return ExitCode::from(2);
        }
    };
    match command {
        "check" => {
            let findings = ops::check(&config).await;
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
        "status" => match ops::status(&config).await {
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
        },
        _ => {
            telemetry::init_logging(config.log_json);
            let shutdown = match shutdown::on_signals() {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("pg-outbox-relay: cannot install signal handlers: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let metrics = Arc::new(telemetry::Metrics::default());
            if let Some(addr) = config.metrics_addr.clone() {
                let (m, t) = (metrics.clone(), shutdown.clone());
                tokio::spawn(async move {
                    if let Err(e) = telemetry::serve(addr, m, t).await {
                        tracing::error!(error = %e, "metrics endpoint failed");
                    }
                });
            }
            let result = if command == "ingest" {
                ingest::run(&config, shutdown, metrics).await
            } else {
                pipeline::run(&config, shutdown, metrics).await
            };
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "relay stopped");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
