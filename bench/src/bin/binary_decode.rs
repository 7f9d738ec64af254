//! `binary_decode HOST PORT USER DATABASE SLOT PUBLICATION END_LSN`: the decoding limit of the relay
//! drain in `make bench`. Streams SLOT (pgoutput, messages on, the relay's options) with the relay's
//! replication client, pgwire-replication, and only counts the pg_outbox messages until the first
//! commit at or past END_LSN: no envelope check, no Kafka. What is left is the walsender's decoding
//! and the client's framing, the part of the relay's work that no relay can avoid.
//!
//! Prints the elapsed seconds, from connecting to the last commit; the counts go to stderr.

use anyhow::{bail, Context, Result};
use pg_outbox_envelope::MESSAGE_PREFIX;
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent};
use std::time::Instant;

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, host, port, user, database, slot, publication, end] = args.as_slice() else {
        bail!("usage: binary_decode HOST PORT USER DATABASE SLOT PUBLICATION END_LSN");
    };
    let end = Lsn::parse(end).context("END_LSN")?;
    let started = Instant::now();
    let config = ReplicationConfig::new(
        host.clone(),
        user.clone(),
        String::new(),
        database.clone(),
        slot.clone(),
        publication.clone(),
    )
    .with_port(port.parse().context("PORT")?)
    .with_start_lsn(Lsn::ZERO);
    let mut repl = ReplicationClient::connect(config).await?;
    let (mut messages, mut bytes, mut transactions) = (0u64, 0u64, 0u64);
    loop {
        let Some(event) = repl.recv().await? else {
            bail!("the stream ended before {end}");
        };
        match event {
            ReplicationEvent::Message {
                prefix, content, ..
            } if prefix == MESSAGE_PREFIX => {
                messages += 1;
                bytes += content.len() as u64;
            }
            ReplicationEvent::Commit { end_lsn, .. } => {
                transactions += 1;
                if end_lsn >= end {
                    break;
                }
            }
            _ => {}
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    repl.update_applied_lsn(end);
    repl.shutdown().await?;
    eprintln!("binary_decode: {messages} messages ({bytes} bytes) in {transactions} transactions");
    println!("{elapsed:.3}");
    Ok(())
}
