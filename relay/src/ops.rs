//! `check` and `status`: what an operator asks before and while the relay runs.

use crate::config::{Config, SourceKind};
use crate::error::RelayError;
use crate::postgres::connect;
use crate::source::slot::SlotState;
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

/// Whether PUBLIC may execute `pg_logical_emit_message` (PostgreSQL's default): then any role can
/// write `pg_outbox` messages into the slot. None is published (nothing proves enqueue wrote it) and
/// each costs the relay a counter, but a flood of them still costs decoding; a note, not a failure.
async fn public_emit(pg: &Client) -> Option<Finding> {
    let open: bool = pg
        .query_one(
            "SELECT pg_catalog.bool_or(pg_catalog.has_function_privilege('public', p.oid, 'EXECUTE')) \
               FROM pg_catalog.pg_proc p \
              WHERE p.proname = 'pg_logical_emit_message' \
                AND p.pronamespace = 'pg_catalog'::pg_catalog.regnamespace",
            &[],
        )
        .await
        .ok()?
        .get::<_, Option<bool>>(0)?;
    open.then(|| {
        finding(
            true,
            "PUBLIC may execute pg_logical_emit_message: any role can write pg_outbox messages into \
             the slot (never published, counted in pg_outbox_relay_unproven_messages_total); a \
             superuser may revoke it (docs/guarantees.md, \"The security boundary in the database\")",
            "",
        )
    })
}

/// Verifies everything `run` needs; returns one finding per check.
pub async fn check(config: &Config) -> Vec<Finding> {
    let mut out = Vec::new();
    match crate::postgres::connect_at(&config.postgres).await {
        Err(e) => out.push(finding(
            false,
            format!("postgres {} reachable: {e}", config.postgres.servers()),
            "check pg_url, pg_host, pg_port, pg_user, pg_password and pg_database",
        )),
        Ok((pg, at)) => {
            out.push(finding(
                true,
                format!("postgres {}:{} reachable", at.host, at.port),
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
                    q("SELECT pg_catalog.current_setting('wal_level') WHERE $1::text IS NOT NULL")
                        .await;
                out.push(finding(
                    wal_level == "logical",
                    format!("wal_level = {wal_level}"),
                    "set wal_level = logical in postgresql.conf and restart PostgreSQL",
                ));
            }
            // the C extension has its row in pg_extension; the SQL edition marks itself with
            // outbox._edition() (scripts/sql-edition.sh)
            let ext = q("SELECT coalesce((SELECT 'extension ' || extversion FROM pg_catalog.pg_extension \
                                            WHERE extname = 'pg_outbox'), \
                                          (SELECT pg_catalog.obj_description(p, 'pg_proc') \
                                             FROM pg_catalog.to_regprocedure('outbox._edition()') p \
                                            WHERE p IS NOT NULL)) \
                          WHERE $1::text IS NOT NULL").await;
            out.push(finding(
                !ext.is_empty(),
                format!(
                    "pg_outbox installed ({})",
                    if ext.is_empty() { "missing" } else { &ext }
                ),
                "CREATE EXTENSION pg_outbox in this database, or install the SQL edition \
                 (sql-edition/pg_outbox.sql, docs/sql-edition.md)",
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
            if wal {
                out.extend(failover(&pg, &config.source.slot).await);
                out.extend(idle_timeout(&pg).await);
                out.extend(public_emit(&pg).await);
            }
            if let Some(f) = unserved(&pg, config).await {
                out.push(f);
            }
            let (grants, fix) = if wal {
                (
                    q("SELECT CASE WHEN rolsuper THEN 'superuser' \
                             WHEN rolreplication AND pg_catalog.pg_has_role(current_user, 'outbox_relay', 'member') \
                             THEN 'replication + outbox_relay' ELSE 'missing' END \
                        FROM pg_catalog.pg_roles WHERE rolname = current_user AND $1::text IS NOT NULL").await,
                    format!(
                        "ALTER ROLE {} REPLICATION; GRANT outbox_relay TO {}",
                        config.postgres.user, config.postgres.user
                    ),
                )
            } else {
                // the poll source reads and deletes outbox.events: no replication needed
                (
                    q("SELECT CASE WHEN rolsuper THEN 'superuser' \
                             WHEN pg_catalog.pg_has_role(current_user, 'outbox_relay', 'member') \
                             THEN 'outbox_relay' ELSE 'missing' END \
                        FROM pg_catalog.pg_roles WHERE rolname = current_user AND $1::text IS NOT NULL").await,
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
    let reachable = crate::kafka::probe::reachable(&config.kafka).await;
    out.push(match reachable {
        Ok(Ok(n)) => finding(
            true,
            format!("kafka {} reachable ({n} broker(s))", config.kafka.brokers),
            "",
        ),
        Ok(Err(reason)) => finding(
            false,
            format!("kafka {}: {reason}", config.kafka.brokers),
            "check security.protocol, sasl.mechanism, sasl.username, sasl.password and the ssl.* \
             settings in [kafka]",
        ),
        Err(e) => finding(
            false,
            format!("kafka {} reachable: {e}", config.kafka.brokers),
            "check brokers and the [kafka] security settings",
        ),
    });
    out
}

/// PostgreSQL 18 invalidates a slot nobody streams from for `idle_replication_slot_timeout`: with
/// the relay down that long, the events the slot retained are lost.
async fn idle_timeout(pg: &Client) -> Option<Finding> {
    let timeout: String = pg
        .query_one(
            "SELECT setting FROM pg_catalog.pg_settings WHERE name = 'idle_replication_slot_timeout'",
            &[],
        )
        .await
        .ok()?
        .get(0);
    let off = timeout == "0";
    Some(finding(
        off,
        format!(
            "idle_replication_slot_timeout = {} min",
            timeout
        ),
        "a slot that no relay streams from for that long is invalidated and its events lost: set it \
         to 0, or far above any relay outage you could have (run a standby relay)",
    ))
}

/// Whether the slot survives a promotion of this primary's standbys (only asked when there are
/// standbys): on 17+ it must be a failover slot, and `synchronized_standby_slots` must name the
/// standbys' physical slots, so that no event is published before a standby has it.
async fn failover(pg: &Client, slot: &str) -> Vec<Finding> {
    let row = pg
        .query_one(
            "SELECT pg_catalog.current_setting('server_version_num')::int, \
                    (SELECT pg_catalog.count(*) FROM pg_catalog.pg_stat_replication r WHERE r.pid NOT IN \
                       (SELECT active_pid FROM pg_catalog.pg_replication_slots \
                         WHERE slot_type = 'logical' AND active)), \
                    (SELECT pg_catalog.string_agg(slot_name::text, ',' ORDER BY slot_name) \
                       FROM pg_catalog.pg_replication_slots WHERE slot_type = 'physical' AND active)",
            &[],
        )
        .await;
    let Ok(row) = row else { return Vec::new() };
    let (version, standbys): (i32, i64) = (row.get(0), row.get(1));
    let physical: Option<String> = row.get(2);
    if standbys == 0 {
        return Vec::new();
    }
    if version < 170000 {
        return vec![finding(
            true,
            format!(
                "{standbys} standby(s): PostgreSQL before 17 does not copy the slot to standbys; a \
                 promotion stops the relay until outbox.recreate_slot (docs/operations.md, \"Failover before 17\")"
            ),
            "",
        )];
    }
    // the version-specific columns and settings are read only on 17+
    let flags = pg
        .query_opt(
            "SELECT s.failover, pg_catalog.current_setting('synchronized_standby_slots') \
             FROM pg_catalog.pg_replication_slots s WHERE s.slot_name = $1",
            &[&slot],
        )
        .await;
    let Ok(Some(flags)) = flags else {
        return Vec::new();
    };
    let (is_failover, synced_slots): (bool, String) = (flags.get(0), flags.get(1));
    let listed: Vec<&str> = synced_slots.split(',').map(str::trim).collect();
    let missing: Vec<&str> = physical
        .as_deref()
        .unwrap_or_default()
        .split(',')
        .filter(|p| !p.is_empty() && !listed.contains(p))
        .collect();
    vec![
        finding(
            is_failover,
            format!("slot {slot} is a failover slot ({standbys} standby(s)): {is_failover}"),
            format!(
                "psql \"dbname=<db> replication=database\" -c 'ALTER_REPLICATION_SLOT {slot} (FAILOVER true)'; \
                 on the standbys: sync_replication_slots = on, hot_standby_feedback = on, \
                 primary_slot_name, dbname in primary_conninfo"
            ),
        ),
        finding(
            !synced_slots.trim().is_empty() && missing.is_empty(),
            format!(
                "synchronized_standby_slots = '{synced_slots}' (standbys' slots: {})",
                physical.as_deref().unwrap_or("none")
            ),
            format!(
                "ALTER SYSTEM SET synchronized_standby_slots = '<each standby's physical slot>'; \
                 SELECT pg_reload_conf(); (missing: {}) otherwise a promoted standby may lack \
                 events that were already published",
                if missing.is_empty() { "all".to_string() } else { missing.join(", ") }
            ),
        ),
    ]
}

/// Events waiting where this relay does not read: `pg_outbox.mode` is a per-session setting, so a
/// writer in `table` mode while only a wal relay runs (or the reverse) is never published.
async fn unserved(pg: &Client, config: &Config) -> Option<Finding> {
    let (sql, what, fix) = match config.source.kind {
        SourceKind::Wal => (
            "SELECT pg_catalog.count(*) FROM outbox.events",
            "event(s) wait in outbox.events (table mode); this relay reads the slot (source = wal)",
            "run a relay with source = poll for this database too, or enqueue in wal mode only \
             (ALTER ROLE/DATABASE ... SET pg_outbox.mode = 'wal')",
        ),
        SourceKind::Poll => (
            "SELECT pg_catalog.count(*) FROM pg_catalog.pg_replication_slots s \
               JOIN outbox.sources o ON o.source = 'slot:' || s.slot_name \
              WHERE s.database = pg_catalog.current_database() AND NOT s.active",
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
    if config.source.kind == SourceKind::Poll {
        return poll_status(&pg, config).await;
    }
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
                    coalesce(pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), s.confirmed_flush_lsn)::bigint, 0), \
                    coalesce(pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), s.restart_lsn)::bigint, 0), \
                    coalesce(s.wal_status, '-'), \
                    coalesce((SELECT extract(epoch FROM r.flush_lag)::float8 \
                                FROM pg_catalog.pg_stat_replication r WHERE r.pid = s.active_pid), 0) \
             FROM pg_catalog.pg_replication_slots s WHERE s.slot_name = $1",
            &[&config.source.slot],
        )
        .await?
        .ok_or_else(|| {
            RelayError::transient(format!("slot \"{}\" disappeared", config.source.slot))
        })?;
    let active = crate::source::wal::slot_holder(&pg, &config.source.slot).await?;
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
        (
            "active_relay".into(),
            active.unwrap_or_else(|| "none: no relay streams from the slot".into()),
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
    // what PostgreSQL 17 added to pg_replication_slots: since when nobody streams, and why a slot
    // was invalidated
    let version: i32 = pg
        .query_one(
            "SELECT pg_catalog.current_setting('server_version_num')::int",
            &[],
        )
        .await?
        .get(0);
    if version >= 170000 {
        let more = pg
            .query_one(
                "SELECT coalesce(inactive_since::text, '-'), coalesce(invalidation_reason, '-'), \
                        failover::text FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
                &[&config.source.slot],
            )
            .await?;
        out.push(("inactive_since".into(), more.get(0)));
        out.push(("invalidation_reason".into(), more.get(1)));
        out.push(("failover_slot".into(), more.get(2)));
    }
    if let Some(problem) = problem {
        out.push(("problem".into(), problem));
    }
    if state.tracked {
        let source = pg
            .query_one(
                "SELECT coalesce((SELECT incarnation::text FROM outbox.sources WHERE source = 'slot:' || $1), '-'), \
                        (SELECT pg_catalog.count(*) FROM outbox.gaps WHERE source = 'slot:' || $1), \
                        (SELECT stopped FROM outbox.sources WHERE source = 'slot:' || $1)",
                &[&config.source.slot],
            )
            .await?;
        out.push(("incarnation".into(), source.get(0)));
        if let Some(why) = source.get::<_, Option<String>>(2) {
            out.push(("stopped".into(), why));
        }
        out.push(("recorded_gaps".into(), source.get::<_, i64>(1).to_string()));
    }
    let oldest = pg
        .query_one(
            "SELECT coalesce((SELECT pg_catalog.min(created_at)::text FROM outbox.events), 'none'), \
                    (SELECT pg_catalog.count(*) FROM outbox.dead_letters)",
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

/// `status` of a poll relay: who polls, and what waits in outbox.events.
async fn poll_status(pg: &Client, config: &Config) -> Result<Vec<(String, String)>, RelayError> {
    let id = &config.source.source_id;
    let active = crate::source::poll::lock_holder(pg, id).await?;
    let row = pg
        .query_one(
            "SELECT coalesce((SELECT incarnation::text FROM outbox.sources WHERE source = 'poll:' || $1), '-'), \
                    (SELECT pg_catalog.count(*) FROM outbox.events), \
                    coalesce((SELECT pg_catalog.min(created_at)::text FROM outbox.events), 'none'), \
                    (SELECT pg_catalog.count(*) FROM outbox.dead_letters)",
            &[id],
        )
        .await?;
    let mut out = vec![
        ("source".to_string(), format!("poll:{id}")),
        (
            "active_relay".into(),
            match active {
                Some(h) if h.relay => h.who,
                // a session that took the lock key is no relay: a relay that starts takes a new key
                Some(h) => format!(
                    "none: the lock is held by {}, whose role is no member of outbox_relay \
                     (a relay that starts takes a new lock key)",
                    h.who
                ),
                None => "none: no relay polls this source".into(),
            },
        ),
        ("incarnation".into(), row.get(0)),
        (
            "unpublished_table_events".into(),
            row.get::<_, i64>(1).to_string(),
        ),
        ("oldest_unpublished_table_event".into(), row.get(2)),
        ("dead_letters".into(), row.get::<_, i64>(3).to_string()),
    ];
    if let Some(f) = unserved(pg, config).await {
        out.push(("unserved".into(), f.what));
    }
    Ok(out)
}

/// `check`, printed: one line per finding (with the fix under a failed one), or with `--json` one
/// object `{"ok": bool, "findings": [{"ok": bool, "what": "...", "fix": "..."}]}` (`fix` is empty
/// for a finding that passed). Exit status 1 when a finding failed.
pub async fn print_check(config: &Config, json: bool) -> std::process::ExitCode {
    let findings = check(config).await;
    let ok = findings.iter().all(|f| f.ok);
    if json {
        let list: Vec<serde_json::Value> = findings
            .iter()
            .map(|f| serde_json::json!({ "ok": f.ok, "what": f.what, "fix": f.fix }))
            .collect();
        println!("{}", serde_json::json!({ "ok": ok, "findings": list }));
    } else {
        for f in &findings {
            if f.ok {
                println!("ok    {}", f.what);
            } else {
                println!("FAIL  {}\n      fix: {}", f.what, f.fix);
            }
        }
    }
    if ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

/// `status` fields that are numbers in `--json` (always numbers, whatever the state).
const NUMERIC_STATUS: &[&str] = &[
    "lag_bytes",
    "lag_seconds",
    "retained_wal_bytes",
    "recorded_gaps",
    "dead_letters",
    "unpublished_table_events",
];

/// `status` as one JSON object: the names of the text form, numbers for [`NUMERIC_STATUS`],
/// strings for the rest.
pub fn status_json(lines: &[(String, String)]) -> serde_json::Value {
    let map = lines
        .iter()
        .map(|(k, v)| {
            let value = if NUMERIC_STATUS.contains(&k.as_str()) {
                v.parse::<f64>()
                    .ok()
                    .and_then(|n| {
                        if n.fract() == 0.0 && k != "lag_seconds" {
                            Some(serde_json::Value::from(n as i64))
                        } else {
                            serde_json::Number::from_f64(n).map(serde_json::Value::Number)
                        }
                    })
                    .unwrap_or(serde_json::Value::Null)
            } else {
                serde_json::Value::String(v.clone())
            };
            (k.clone(), value)
        })
        .collect::<serde_json::Map<_, _>>();
    serde_json::Value::Object(map)
}

/// `status`, printed as `name value` lines, or with `--json` one object (`{"error": "..."}` when it
/// fails). Exit status 1 on failure, 3 when an operator must act (the slot is gone).
pub async fn print_status(config: &Config, json: bool) -> std::process::ExitCode {
    match status(config).await {
        Ok(lines) => {
            if json {
                println!("{}", status_json(&lines));
            } else {
                for (k, v) in lines {
                    println!("{k:<32}{v}");
                }
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            if json {
                println!("{}", serde_json::json!({ "error": e.to_string() }));
            }
            eprintln!("pg-outbox-relay: {e}");
            std::process::ExitCode::from(e.exit_code())
        }
    }
}

/// `healthcheck`: asks a running relay's `/healthz` and prints its one-line answer. Exit 0 when it
/// is 200 (`ok: active` or `standby: ...`); with `--live`, also when it is 503 for anything but a
/// stall (reconnecting, degraded: a restart would not help); else 1.
pub async fn healthcheck(h: &crate::config::Healthcheck) -> std::process::ExitCode {
    let timeout = std::time::Duration::from_millis(h.timeout_ms.max(1));
    let answer = tokio::time::timeout(timeout, ask_healthz(&h.metrics_addr)).await;
    let (healthy, line) = match answer {
        Err(_) => (
            false,
            format!(
                "no answer from {} within {} ms",
                h.metrics_addr,
                timeout.as_millis()
            ),
        ),
        Ok(Err(e)) => (false, format!("{}: {e}", h.metrics_addr)),
        Ok(Ok((code, body))) => {
            let body = body.lines().next().unwrap_or("").to_string();
            let ok = code == 200 || (h.live && code == 503 && !body.starts_with("stalled"));
            (
                ok,
                if body.is_empty() {
                    format!("HTTP {code}")
                } else {
                    body
                },
            )
        }
    };
    println!("{line}");
    if healthy {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

/// Where to ask: an unspecified address (the relay listens on all interfaces) on loopback.
pub fn probe_address(addr: &str) -> String {
    if let Some(port) = addr.strip_prefix("0.0.0.0:") {
        format!("127.0.0.1:{port}")
    } else if let Some(port) = addr.strip_prefix("[::]:") {
        format!("[::1]:{port}")
    } else {
        addr.to_string()
    }
}

/// `GET /healthz`: the status code and the body.
async fn ask_healthz(addr: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(probe_address(addr)).await?;
    stream
        .write_all(b"GET /healthz HTTP/1.0\r\nhost: localhost\r\n\r\n")
        .await?;
    let mut raw = Vec::new();
    // an answer is a few lines; never read more than this from whatever listens there
    stream.take(64 * 1024).read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw);
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("not an HTTP answer"))?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((code, body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_json_keeps_the_names_and_types_numbers() {
        let lines = [
            ("slot", "pg_outbox"),
            ("lag_bytes", "1024"),
            ("lag_seconds", "0.250"),
            ("retained_wal_bytes", "0"),
            ("incarnation", "-"),
            ("dead_letters", "x"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let j = status_json(&lines);
        assert_eq!(j["slot"], "pg_outbox");
        assert_eq!(j["lag_bytes"], 1024);
        assert_eq!(j["lag_seconds"], 0.25);
        assert_eq!(j["retained_wal_bytes"], 0);
        assert_eq!(j["incarnation"], "-");
        assert!(j["dead_letters"].is_null());
    }

    #[test]
    fn an_unspecified_address_is_probed_on_loopback() {
        assert_eq!(probe_address("0.0.0.0:9187"), "127.0.0.1:9187");
        assert_eq!(probe_address("[::]:9187"), "[::1]:9187");
        assert_eq!(probe_address("10.0.0.5:9187"), "10.0.0.5:9187");
    }

    #[tokio::test]
    async fn healthcheck_reads_the_status_and_the_first_line() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let answers = [
            "HTTP/1.0 200 OK\r\n\r\nstandby: slot \"s\" is streamed\n",
            "HTTP/1.0 503 Service Unavailable\r\n\r\nstalled: 3 record(s)\n",
        ];
        tokio::spawn(async move {
            for answer in answers {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 256];
                let _ = s.read(&mut buf).await.unwrap();
                s.write_all(answer.as_bytes()).await.unwrap();
            }
        });
        assert_eq!(
            ask_healthz(&addr).await.unwrap(),
            (200, "standby: slot \"s\" is streamed\n".to_string())
        );
        let (code, body) = ask_healthz(&addr).await.unwrap();
        assert_eq!((code, body.starts_with("stalled")), (503, true));
    }
}
