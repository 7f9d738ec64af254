//! `peek_events PORT DB SLOT`: prints the pg_outbox events a slot holds, decoded, without consuming
//! them. Used by `make demo` until the relay publishes them to Kafka.

use anyhow::{Context, Result};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, port, db, slot] = args.as_slice() else {
        anyhow::bail!("usage: peek_events PORT DB SLOT");
    };
    let client = pg_outbox_tests::connect(port.parse().context("PORT")?, db).await?;
    let events = pg_outbox_tests::peek_wal_events(&client, slot).await?;
    println!("{} event(s) in slot {slot}, in commit order:", events.len());
    for e in events {
        let headers: Vec<String> = e
            .headers
            .iter()
            .map(|(n, v)| format!("{n}={}", String::from_utf8_lossy(v)))
            .collect();
        println!(
            "  {id}  topic={topic}  key={key}  headers=[{headers}]  payload={payload}",
            id = e.id,
            topic = e.topic,
            key = e.key.as_deref().unwrap_or("(null)"),
            headers = headers.join(", "),
            payload = if e.payload_is_json {
                String::from_utf8_lossy(&e.payload).into_owned()
            } else {
                format!("{} bytes", e.payload.len())
            },
        );
    }
    Ok(())
}
