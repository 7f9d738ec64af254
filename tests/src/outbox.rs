//! Writing events as an application does: `outbox.enqueue` from a session, one call per event, and
//! what table mode leaves behind in `outbox.events`.

use anyhow::Result;
use tokio_postgres::Client;
use uuid::Uuid;

/// `outbox.enqueue(topic, key, payload)` with a JSON payload; returns the event id.
pub async fn enqueue(c: &Client, topic: &str, key: &str, payload: &str) -> Result<Uuid> {
    Ok(c.query_one(
        "SELECT outbox.enqueue($1, $2, $3::text::jsonb)",
        &[&topic, &key, &payload],
    )
    .await?
    .get(0))
}

/// [`enqueue`] with headers (a JSON object of strings); returns the event id.
pub async fn enqueue_with_headers(
    c: &Client,
    topic: &str,
    key: &str,
    payload: &str,
    headers: &str,
) -> Result<Uuid> {
    Ok(c.query_one(
        "SELECT outbox.enqueue($1, $2, $3::text::jsonb, $4::text::jsonb)",
        &[&topic, &key, &payload, &headers],
    )
    .await?
    .get(0))
}

/// The payload `{"n": n}` that numbers a test's events (read back with [`crate::payload_n`]).
pub fn numbered(n: i64) -> String {
    format!(r#"{{"n": {n}}}"#)
}

/// Enqueues [`numbered`] payloads for each n in `ns` to `topic` under `key`, one transaction each;
/// returns the event ids in order.
pub async fn enqueue_numbered(
    c: &Client,
    topic: &str,
    key: &str,
    ns: impl IntoIterator<Item = i64>,
) -> Result<Vec<Uuid>> {
    let mut ids = Vec::new();
    for n in ns {
        ids.push(enqueue(c, topic, key, &numbered(n)).await?);
    }
    Ok(ids)
}

/// How many rows wait in `outbox.events` (table mode) as `c` sees them.
pub async fn outbox_rows(c: &Client) -> Result<i64> {
    Ok(c.query_one("SELECT count(*) FROM outbox.events", &[])
        .await?
        .get(0))
}

/// Waits until the relay removed every table-mode event it published.
pub async fn outbox_drained(c: &Client) -> Result<()> {
    crate::wait_for(
        "the published events to be removed",
        std::time::Duration::from_secs(30),
        || async { Ok(outbox_rows(c).await? == 0) },
    )
    .await
}
