//! `pg-outbox-relay run|check|status`: see the library for everything.
use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    pg_outbox_relay::main(pg_outbox_relay::config::Cli::parse()).await
}
