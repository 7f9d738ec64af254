//! `check` and `status`: what an operator asks before and while the relay runs.

use crate::config::{Config, SourceKind};
use crate::error::RelayError;
use crate::postgres::connect;
use crate::sink::kafka::off_runtime;
use crate::source::slot::SlotState;
use rdkafka::producer::{BaseProducer, Producer};
use std::time::Duration;
use tokio_postgres::Client;

/// One line of `check` output.
pub struct Finding {
    pub ok: bool,
    pub what: String,
    pub fix: String,
}

fn finding(ok: bool, what: impl Into<String>, fix: impl Into<String>) -> Finding {
    Finding {
        ok,
        what: what.into(),
        fix: fix.into(),
    }
}

/// Verifies everything `run` needs; returns one finding per check.
pub async fn check(config: &Config) -> Vec<Finding> {
    let mut out = Vec::new();
    match connect(&config.postgres).await {
        Err(e) => out.push(finding(
            false,
            format!(
                "postgres {}:{} reachable: {e}",
                config.postgres.host, config.postgres.port
            ),
            "check pg_host, pg_port, pg_user, pg_password and pg_database",
        )),
        Ok(pg) => {
            out.push(finding(
                true,
                format!(
                    "postgres {}:{} reachable",
                    config.postgres.host, config.postgres.port
                ),
                "",
            ));
            let q = |sql: &'static str| {
                let pg = &pg;
                let slot = config.source.slot.clone();
                async move {
                    pg.query_one(sql, &[&slot])
                        .await
                        .map(|r| r.get::<_, Option<String>>(0).unwrap_or_default())
                        .unwrap_or_else(|e| format!("error: {e}"))
                }
            };
            // the slot's prerequisites matter to a wal relay only
            let wal = config.source.kind == SourceKind::Wal;
            if wal {
                let wal_level =
                    q("SELECT current_setting('wal_level') WHERE $1::text IS NOT NULL").await;
                out.push(finding(
                    wal_level == "logical",
                    format!("wal_level = {wal_level}"),
                    "set wal_level = logical in postgresql.conf and restart PostgreSQL",
                ));
            }
            let ext = q("SELECT extversion FROM pg_extension WHERE extname = 'pg_outbox' AND $1::text IS NOT NULL UNION ALL SELECT NULL LIMIT 1").await;
            out.push(finding(
                !ext.is_empty(),
                format!(
                    "extension pg_outbox installed ({})",
                    if ext.is_empty() { "missing" } else { &ext }
                ),
                "CREATE EXTENSION pg_outbox in this database",
            ));
            if wal {
                match SlotState::read(&pg, &config.source.slot).await {
                    Ok(state) => {
                        let problem = state
                            .problem(&pg, &config.postgres.database, config.source.create_slot)
                            .await
                            .unwrap_or_else(|e| Some(e.to_string()));
                        let what = match &state.slot {
                            None => "missing".to_string(),
                            Some((db, plugin, status)) => format!(
                                "{}/{}/{}",
                                plugin.as_deref().unwrap_or_default(),
                                db.as_deref().unwrap_or_default(),
                                status.as_deref().unwrap_or_default()
                            ),
                        };
                        out.push(finding(
                            problem.is_none(),
                            format!("slot {}: {what}", config.source.slot),
                            problem.unwrap_or_default(),
                        ));
                        out.push(finding(
                            state.publication
                                || (config.source.create_slot && state.slot.is_none()),
                            format!(
                                "publication {}: {}",
                                config.source.slot,
                                if state.publication {
                                    "present"
                                } else {
                                    "missing"
                                }
                            ),
                            "CALL outbox.setup() creates it (before the slot)",
                        ));
                    }
                    Err(e) => out.push(finding(
                        false,
                        format!("slot {}: {e}", config.source.slot),
                        "check that the role may read pg_replication_slots and pg_publication",
                    )),
                }
            }
            if let Some(f) = unserved(&pg, config).await {
                out.push(f);
            }
            let (grants, fix) = if wal {
                (
                    q("SELECT CASE WHEN rolsuper THEN 'superuser' WHEN rolreplication AND pg_has_role(current_user, 'outbox_relay', 'member') THEN 'replication + outbox_relay' ELSE 'missing' END FROM pg_roles WHERE rolname = current_user AND $1::text IS NOT NULL").await,
                    format!(
                        "ALTER ROLE {} REPLICATION; GRANT outbox_relay TO {}",
                        config.postgres.user, config.postgres.user
                    ),
                )
            } else {
                // the poll source reads and deletes outbox.events: no replication needed
                (
                    q("SELECT CASE WHEN rolsuper THEN 'superuser' WHEN pg_has_role(current_user, 'outbox_relay', 'member') THEN 'outbox_relay' ELSE 'missing' END FROM pg_roles WHERE rolname = current_user AND $1::text IS NOT NULL").await,
                    format!("GRANT outbox_relay TO {}", config.postgres.user),
                )
            };
            out.push(finding(
                grants != "missing" && !grants.starts_with("error"),
                format!("role {}: {grants}", config.postgres.user),
                fix,
            ));
        }
    }
    let cc = config.kafka.client_config();
    let reachable = off_runtime("metadata task", move || {
        let producer: BaseProducer = cc.create()?;
        let md = producer
            .client()
            .fetch_metadata(None, Duration::from_secs(5))?;
        Ok(md.brokers().len())
    })
    .await;
    out.push(match reachable {
        Ok(n) => finding(
            true,
            format!("kafka {} reachable ({n} broker(s))", config.kafka.brokers),
            "",
        ),
        Err(e) => finding(
            false,
            format!("kafka {} reachable: {e}", config.kafka.brokers),
            "check brokers and the [kafka] security settings",
        ),
    });
    out
}

/// Events waiting where this relay does not read: `pg_outbox.mode` is a per-session setting, so a
/// writer in `table` mode while only a wal relay runs (or the reverse) is never published.
async fn unserved(pg: &Client, config: &Config) -> Option<Finding> {
    let (sql, what, fix) = match config.source.kind {
        SourceKind::Wal => (
            "SELECT count(*) FROM outbox.events",
            "event(s) wait in outbox.events (table mode); this relay reads the slot (source = wal)",
            "run a relay with source = poll for this database too, or enqueue in wal mode only \
             (ALTER ROLE/DATABASE ... SET pg_outbox.mode = 'wal')",
        ),
        SourceKind::Poll => (
            "SELECT count(*) FROM pg_replication_slots s JOIN outbox.sources o ON o.source = 'slot:' || s.slot_name \
              WHERE s.database = current_database() AND NOT s.active",
            "pg_outbox slot(s) of this database hold wal-mode events and nobody streams them; this relay \
             reads outbox.events (source = poll)",
            "run a relay with source = wal for this database too, or enqueue in table mode only \
             (ALTER ROLE/DATABASE ... SET pg_outbox.mode = 'table')",
        ),
    };
    let n: i64 = pg.query_one(sql, &[]).await.ok()?.get(0);
    Some(finding(
        n == 0,
        if n == 0 {
            "no events wait where this relay does not read".to_string()
        } else {
            format!("{n} {what}")
        },
        fix,
    ))
}

/// `status`: slot lag and retention, as `name: value` lines.
pub async fn status(config: &Config) -> Result<Vec<(String, String)>, RelayError> {
    let pg = connect(&config.postgres).await?;
    let state = SlotState::read(&pg, &config.source.slot).await?;
    let problem = state.problem(&pg, &config.postgres.database, false).await?;
    if state.slot.is_none() {
        return Err(RelayError::permanent(problem.unwrap_or_else(|| {
            format!("slot \"{}\" does not exist", config.source.slot)
        })));
    }
    let row = pg
        .query_opt(
            "SELECT s.active, coalesce(s.active_pid::text, '-'), coalesce(s.confirmed_flush_lsn::text, '-'), \
                    coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::bigint, 0), \
                    coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::bigint, 0), \
                    coalesce(s.wal_status, '-'), \
                    coalesce((SELECT extract(epoch FROM r.flush_lag)::float8 FROM pg_stat_replication r WHERE r.pid = s.active_pid), 0) \
             FROM pg_replication_slots s WHERE s.slot_name = $1",
            &[&config.source.slot],
        )
        .await?
        .ok_or_else(|| {
            RelayError::transient(format!("slot \"{}\" disappeared", config.source.slot))
        })?;
    let mut out = vec![
        ("slot".to_string(), config.source.slot.clone()),
        (
            "active".into(),
            format!(
                "{} (pid {})",
                row.get::<_, bool>(0),
                row.get::<_, String>(1)
            ),
        ),
        ("last_acknowledged_lsn".into(), row.get(2)),
        ("lag_bytes".into(), row.get::<_, i64>(3).to_string()),
        ("lag_seconds".into(), format!("{:.3}", row.get::<_, f64>(6))),
        (
            "retained_wal_bytes".into(),
            row.get::<_, i64>(4).to_string(),
        ),
        ("wal_status".into(), row.get(5)),
    ];
    if let Some(problem) = problem {
        out.push(("problem".into(), problem));
    }
    if state.tracked {
        let source = pg
            .query_one(
                "SELECT coalesce((SELECT incarnation::text FROM outbox.sources WHERE source = 'slot:' || $1), '-'), \
                        (SELECT count(*) FROM outbox.gaps WHERE source = 'slot:' || $1)",
                &[&config.source.slot],
            )
            .await?;
        out.push(("incarnation".into(), source.get(0)));
        out.push(("recorded_gaps".into(), source.get::<_, i64>(1).to_string()));
    }
    let oldest = pg
        .query_one(
            "SELECT coalesce((SELECT min(created_at)::text FROM outbox.events), 'none'), \
                    (SELECT count(*) FROM outbox.dead_letters)",
            &[],
        )
        .await?;
    out.push(("oldest_unpublished_table_event".into(), oldest.get(0)));
    if let Some(f) = unserved(&pg, config).await {
        out.push(("unserved".into(), f.what));
    }
    out.push(("dead_letters".into(), oldest.get::<_, i64>(1).to_string()));
    Ok(out)
}
