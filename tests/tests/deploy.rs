//! The monitoring files in `deploy/` (no promtool or Grafana here): the alert rules and the
//! dashboard have the structure Prometheus and Grafana load, every metric they name is one the
//! relay exports (its registry's own list, [`Metrics::exported_names`]), every exported metric is
//! shown or alerted on, and docs/operations.md ("Metrics, dashboard and alerts") documents every
//! metric and every alert. No cluster needed.

use anyhow::{bail, ensure, Context, Result};
use pg_outbox_relay::telemetry::Metrics;
use serde_json::Value;
use std::collections::{BTreeSet, HashSet};
use std::path::PathBuf;
use yaml_rust2::{Yaml, YamlLoader};

fn repo_file(path: &str) -> Result<String> {
    let at = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path);
    std::fs::read_to_string(&at).with_context(|| format!("reading {}", at.display()))
}

/// The `pg_outbox_*` names in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("pg_outbox_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.push(name);
    }
    names
}

/// Brackets of every kind balance, outside quoted strings.
fn balanced(expr: &str) -> bool {
    let mut stack = Vec::new();
    let mut quoted = false;
    for c in expr.chars() {
        match c {
            '"' => quoted = !quoted,
            _ if quoted => {}
            '(' | '{' | '[' => stack.push(c),
            ')' | '}' | ']' => {
                let open = match c {
                    ')' => '(',
                    '}' => '{',
                    _ => '[',
                };
                if stack.pop() != Some(open) {
                    return false;
                }
            }
            _ => {}
        }
    }
    stack.is_empty() && !quoted
}

/// The metric family a sample name belongs to.
fn family(name: &str) -> &str {
    ["_total", "_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(name)
}

/// Checks `expr` and returns the families it uses.
fn check_expr(what: &str, expr: &str, exported: &HashSet<String>) -> Result<Vec<String>> {
    ensure!(!expr.trim().is_empty(), "{what}: empty expression");
    ensure!(balanced(expr), "{what}: unbalanced brackets in {expr:?}");
    let names = metric_names(expr);
    for name in &names {
        ensure!(
            exported.contains(name),
            "{what}: {name} is not a metric the relay exports"
        );
    }
    Ok(names.iter().map(|n| family(n).to_string()).collect())
}

fn duration_ok(d: &str) -> bool {
    let digits = d.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &d[digits.len()..];
    !digits.is_empty()
        && digits.chars().all(|c| c.is_ascii_digit())
        && ["ms", "s", "m", "h", "d", "w", "y"].contains(&unit)
}

fn string<'a>(y: &'a Yaml, key: &str, what: &str) -> Result<&'a str> {
    y[key]
        .as_str()
        .with_context(|| format!("{what}: `{key}` must be a string"))
}

/// The alert rules: returns the alert names and the metric families they use.
fn check_alerts(exported: &HashSet<String>) -> Result<(Vec<String>, BTreeSet<String>)> {
    let text = repo_file("deploy/prometheus/pg-outbox-alerts.yml")?;
    let docs = YamlLoader::load_from_str(&text).context("alert rules: YAML")?;
    ensure!(docs.len() == 1, "alert rules: one YAML document");
    let top = docs[0]
        .as_hash()
        .context("alert rules: a mapping at the top")?;
    ensure!(
        top.keys().all(|k| k.as_str() == Some("groups")),
        "alert rules: only `groups` at the top"
    );
    let groups = docs[0]["groups"]
        .as_vec()
        .context("alert rules: `groups` must be a list")?;
    ensure!(!groups.is_empty(), "alert rules: no group");
    let (mut alerts, mut used, mut group_names) = (Vec::new(), BTreeSet::new(), HashSet::new());
    for group in groups {
        let name = string(group, "name", "group")?;
        ensure!(group_names.insert(name), "group {name} twice");
        let rules = group["rules"]
            .as_vec()
            .with_context(|| format!("group {name}: `rules` must be a list"))?;
        ensure!(!rules.is_empty(), "group {name}: no rule");
        for rule in rules {
            let keys = rule.as_hash().context("a rule must be a mapping")?;
            let alert = string(rule, "alert", &format!("group {name}: rule"))?;
            ensure!(
                !alert.is_empty()
                    && alert.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    && !alert.starts_with(|c: char| c.is_ascii_digit()),
                "alert {alert:?}: not a valid alert name"
            );
            for key in keys.keys() {
                let key = key.as_str().unwrap_or_default();
                ensure!(
                    [
                        "alert",
                        "expr",
                        "for",
                        "keep_firing_for",
                        "labels",
                        "annotations"
                    ]
                    .contains(&key),
                    "alert {alert}: unknown key {key:?}"
                );
            }
            let expr = string(rule, "expr", alert)?;
            used.extend(check_expr(alert, expr, exported)?);
            if !rule["for"].is_badvalue() {
                let d = string(rule, "for", alert)?;
                ensure!(duration_ok(d), "alert {alert}: `for: {d}` is no duration");
            }
            let severity = string(
                &rule["labels"],
                "severity",
                &format!("alert {alert} labels"),
            )?;
            ensure!(
                ["critical", "warning", "info"].contains(&severity),
                "alert {alert}: severity {severity:?}"
            );
            for key in ["summary", "description"] {
                let text = string(
                    &rule["annotations"],
                    key,
                    &format!("alert {alert} annotations"),
                )?;
                ensure!(!text.is_empty(), "alert {alert}: empty {key}");
            }
            ensure!(!alerts.contains(&alert.to_string()), "alert {alert} twice");
            alerts.push(alert.to_string());
        }
    }
    Ok((alerts, used))
}

/// The dashboard: returns the metric families its panels and variables use.
fn check_dashboard(exported: &HashSet<String>) -> Result<BTreeSet<String>> {
    let text = repo_file("deploy/grafana/pg-outbox.json")?;
    let dash: Value = serde_json::from_str(&text).context("dashboard: JSON")?;
    for key in ["title", "uid"] {
        ensure!(
            dash[key].as_str().is_some_and(|s| !s.is_empty()),
            "dashboard: `{key}`"
        );
    }
    ensure!(dash["schemaVersion"].is_u64(), "dashboard: `schemaVersion`");
    let mut used = BTreeSet::new();
    for var in dash["templating"]["list"].as_array().into_iter().flatten() {
        let name = var["name"].as_str().context("variable without a name")?;
        if let Some(query) = var["query"]["query"].as_str() {
            used.extend(check_expr(&format!("variable {name}"), query, exported)?);
        }
    }
    let panels = dash["panels"].as_array().context("dashboard: `panels`")?;
    ensure!(!panels.is_empty(), "dashboard: no panel");
    let mut ids = HashSet::new();
    for panel in panels {
        let title = panel["title"].as_str().context("a panel without a title")?;
        let id = panel["id"]
            .as_u64()
            .with_context(|| format!("panel {title}: `id`"))?;
        ensure!(ids.insert(id), "panel id {id} twice");
        let kind = panel["type"].as_str().unwrap_or_default();
        ensure!(
            [
                "row",
                "timeseries",
                "stat",
                "gauge",
                "bargauge",
                "table",
                "text"
            ]
            .contains(&kind),
            "panel {title}: type {kind:?}"
        );
        let grid = &panel["gridPos"];
        let [h, w, x, y] = ["h", "w", "x", "y"].map(|k| grid[k].as_u64());
        let (Some(h), Some(w), Some(x), Some(_)) = (h, w, x, y) else {
            bail!("panel {title}: gridPos needs integer h, w, x and y");
        };
        ensure!(
            h > 0 && w > 0 && x + w <= 24,
            "panel {title}: gridPos outside the 24 columns"
        );
        if kind == "row" || kind == "text" {
            continue;
        }
        let targets = panel["targets"]
            .as_array()
            .filter(|t| !t.is_empty())
            .with_context(|| format!("panel {title}: no targets"))?;
        let mut refs = HashSet::new();
        for target in targets {
            let r = target["refId"]
                .as_str()
                .with_context(|| format!("panel {title}: a target without refId"))?;
            ensure!(refs.insert(r), "panel {title}: refId {r} twice");
            let expr = target["expr"]
                .as_str()
                .with_context(|| format!("panel {title}: a target without expr"))?;
            used.extend(check_expr(&format!("panel {title}"), expr, exported)?);
        }
    }
    Ok(used)
}

#[test]
fn alert_rules_and_dashboard_use_only_exported_metrics_and_the_docs_document_them() -> Result<()> {
    let metrics = Metrics::default();
    let exported: HashSet<String> = metrics.exported_names().iter().cloned().collect();
    let families: BTreeSet<String> = exported.iter().map(|n| family(n).to_string()).collect();
    let (alerts, alerted) = check_alerts(&exported)?;
    let shown = check_dashboard(&exported)?;

    // what issue 24 asks the rules to cover
    for needed in [
        "PgOutboxSlotLagHigh",
        "PgOutboxRetainedWalHigh",
        "PgOutboxRelayStalled",
        "PgOutboxNoStandby",
        "PgOutboxDeadLettersGrowing",
        "PgOutboxIngestLagHigh",
        "PgOutboxRelayDown",
    ] {
        ensure!(alerts.iter().any(|a| a == needed), "no alert {needed}");
    }
    // every metric is on the dashboard or in a rule, but the slot position (a position, not a
    // quantity to graph)
    for f in &families {
        ensure!(
            shown.contains(f) || alerted.contains(f) || f == "pg_outbox_relay_confirmed_lsn",
            "{f} is exported but neither shown nor alerted on"
        );
    }
    // docs/operations.md, "Metrics, dashboard and alerts"
    let doc = repo_file("docs/operations.md")?;
    for f in &families {
        ensure!(
            doc.contains(f.as_str()),
            "docs/operations.md does not document {f}"
        );
    }
    for a in &alerts {
        ensure!(
            doc.contains(a.as_str()),
            "docs/operations.md does not explain alert {a}"
        );
    }
    Ok(())
}

#[test]
fn the_checker_catches_what_it_should() {
    let exported: HashSet<String> = Metrics::default()
        .exported_names()
        .iter()
        .cloned()
        .collect();
    assert!(check_expr(
        "x",
        "rate(pg_outbox_relay_events_published_total[5m])",
        &exported
    )
    .is_ok());
    assert!(check_expr(
        "x",
        "rate(pg_outbox_relay_events_publish_total[5m])",
        &exported
    )
    .is_err());
    assert!(check_expr("x", "sum(rate(pg_outbox_relay_up[5m])", &exported).is_err());
    assert!(check_expr("x", " ", &exported).is_err());
    assert!(duration_ok("15m") && duration_ok("500ms") && !duration_ok("m") && !duration_ok("5 m"));
    assert_eq!(
        metric_names("a{b=\"c\"} + pg_outbox_relay_up * on (instance) pg_outbox_relay_info"),
        ["pg_outbox_relay_up", "pg_outbox_relay_info"]
    );
}
