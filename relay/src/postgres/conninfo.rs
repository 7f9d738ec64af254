//! libpq connection strings, as PostgreSQL users already write them: a URL
//! (`postgres://user:password@host1:5432,host2:5432/db?sslmode=verify-full`) or key-value pairs
//! (`host=a,b port=5432 dbname=db sslmode=require`). The result is a map of libpq keywords; the
//! relay accepts the ones it implements and names any other.

use crate::error::RelayError;
use std::collections::BTreeMap;

/// The libpq keywords the relay applies.
pub const KEYWORDS: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "user",
    "password",
    "dbname",
    "passfile",
    "options",
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "target_session_attrs",
    "connect_timeout",
];

/// The other keywords libpq accepts (PostgreSQL 14 to 18), with why the relay does without them:
/// a connection string copied from a provider's console works, and the log says, once per keyword,
/// what was not applied.
pub const IGNORED: &[(&str, &str)] = &[
    ("application_name", "the relay names its sessions `pg_outbox_relay <pid>@<host>`, which `status` and a standby relay show to name the active relay"),
    ("fallback_application_name", "the relay names its sessions itself"),
    ("channel_binding", "SCRAM channel binding is used when the server offers it over TLS, but not required"),
    ("client_encoding", "the relay's sessions use UTF8"),
    ("keepalives", "the relay's streams send their own status messages every 500 ms and reconnect when the server goes quiet"),
    ("keepalives_idle", "see keepalives"),
    ("keepalives_interval", "see keepalives"),
    ("keepalives_count", "see keepalives"),
    ("tcp_user_timeout", "see keepalives"),
    ("replication", "the relay opens its replication connection itself"),
    ("gssencmode", "GSSAPI encryption is not supported: the relay uses TLS (sslmode)"),
    ("gsslib", "GSSAPI is not supported"),
    ("gssdelegation", "GSSAPI is not supported"),
    ("krbsrvname", "Kerberos is not supported"),
    ("require_auth", "the server's authentication method is not restricted"),
    ("requirepeer", "Unix socket peer checks are not supported"),
    ("requiressl", "deprecated by libpq: use sslmode"),
    ("sslnegotiation", "the relay negotiates TLS the classic way (postgres)"),
    ("sslcompression", "TLS compression is never used"),
    ("sslpassword", "an encrypted client key is not supported: give sslkey unencrypted, readable by the relay only"),
    ("sslcertmode", "a client certificate is sent when sslcert and sslkey are set"),
    ("sslcrl", "certificate revocation lists are not checked"),
    ("sslcrldir", "certificate revocation lists are not checked"),
    ("sslsni", "SNI is always sent for host names"),
    ("sslkeylogfile", "TLS keys are never logged"),
    ("ssl_min_protocol_version", "the relay uses TLS 1.2 or 1.3"),
    ("ssl_max_protocol_version", "the relay uses TLS 1.2 or 1.3"),
    ("min_protocol_version", "the relay speaks protocol 3.0"),
    ("max_protocol_version", "the relay speaks protocol 3.0"),
    ("load_balance_hosts", "hosts are tried in the order given (the primary is wanted)"),
    ("service", "pg_service.conf is not read: give the settings themselves"),
    ("scram_client_key", "internal to libpq"),
    ("scram_server_key", "internal to libpq"),
    ("oauth_issuer", "OAuth is not supported"),
    ("oauth_client_id", "OAuth is not supported"),
    ("oauth_client_secret", "OAuth is not supported"),
    ("oauth_scope", "OAuth is not supported"),
];

/// Parses a URL or key-value connection string into the libpq keywords the relay applies; a
/// keyword libpq accepts but the relay does without is left out and named in `ignored` (with why),
/// an unknown one is refused.
pub fn parse_with_ignored(
    text: &str,
) -> Result<(BTreeMap<String, String>, Vec<String>), RelayError> {
    let text = text.trim();
    let mut map = if let Some(rest) = text
        .strip_prefix("postgresql://")
        .or_else(|| text.strip_prefix("postgres://"))
    {
        parse_url(rest)?
    } else {
        parse_pairs(text)?
    };
    let mut ignored = Vec::new();
    for key in map.keys().cloned().collect::<Vec<_>>() {
        if KEYWORDS.contains(&key.as_str()) {
            continue;
        }
        match IGNORED.iter().find(|(k, _)| *k == key) {
            Some((k, why)) => {
                map.remove(&key);
                ignored.push(format!("pg_url: {k} is ignored: {why}"));
            }
            None => {
                return Err(RelayError::config(format!(
                    "pg_url: {key:?} is not a libpq connection keyword (the relay applies {})",
                    KEYWORDS.join(", ")
                )))
            }
        }
    }
    Ok((map, ignored))
}

/// [`parse_with_ignored`], for callers that do not report what was ignored.
pub fn parse(text: &str) -> Result<BTreeMap<String, String>, RelayError> {
    parse_with_ignored(text).map(|(map, _)| map)
}

fn bad(what: impl std::fmt::Display) -> RelayError {
    RelayError::config(format!("pg_url: {what}"))
}

/// `key=value key='quoted \' value'`: libpq's key-value form.
fn parse_pairs(text: &str) -> Result<BTreeMap<String, String>, RelayError> {
    let mut map = BTreeMap::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(map);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(bad(format!(
                "expected `=` after {key:?} (a URL starts with postgres://)"
            )));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    None => return Err(bad(format!("unterminated quoted value of {key:?}"))),
                    Some('\'') => break,
                    Some('\\') => value.push(
                        chars
                            .next()
                            .ok_or_else(|| bad(format!("unterminated quoted value of {key:?}")))?,
                    ),
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.push(chars.next().unwrap_or('\\'));
                } else {
                    value.push(c);
                }
            }
        }
        map.insert(key, value);
    }
}

/// `[user[:password]@][host[:port][,...]][/dbname][?key=value&...]`, percent-encoded.
///
/// A `/` or `?` ends the part before `@`, so a raw one in a password would cut it in two and put
/// the rest of it in the host, database or options, and from there in error messages: an `@`
/// after the first `/` or `?` is refused with a message that quotes nothing of the URL.
fn parse_url(rest: &str) -> Result<BTreeMap<String, String>, RelayError> {
    if let (Some(at), Some(end)) = (rest.find('@'), rest.find(['/', '?'])) {
        if at > end {
            return Err(bad(
                "an `@` follows a `/` or `?`: percent-encode `/`, `?` and `@` in the user name \
                 and password (%2F, %3F, %40), and `@` anywhere after the host",
            ));
        }
    }
    let mut map = BTreeMap::new();
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (rest, None),
    };
    let hosts = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => {
            let (user, password) = match userinfo.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (userinfo, None),
            };
            if !user.is_empty() {
                map.insert("user".into(), decode(user)?);
            }
            if let Some(p) = password {
                map.insert("password".into(), decode(p)?);
            }
            hosts
        }
        None => authority,
    };
    if !hosts.is_empty() {
        let (mut names, mut ports) = (Vec::new(), Vec::new());
        for spec in hosts.split(',') {
            let (name, port) = if let Some(v6) = spec.strip_prefix('[') {
                let (name, after) = v6
                    .split_once(']')
                    .ok_or_else(|| bad(format!("unterminated [ in host {spec:?}")))?;
                (name, after.strip_prefix(':').unwrap_or(""))
            } else {
                spec.split_once(':').unwrap_or((spec, ""))
            };
            names.push(decode(name)?);
            ports.push(decode(port)?);
        }
        map.insert("host".into(), names.join(","));
        if ports.iter().any(|p| !p.is_empty()) {
            map.insert("port".into(), ports.join(","));
        }
    }
    if let Some(db) = path.filter(|p| !p.is_empty()) {
        map.insert("dbname".into(), decode(db)?);
    }
    for pair in query.into_iter().flat_map(|q| q.split('&')) {
        if pair.is_empty() {
            continue;
        }
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| bad(format!("query parameter {pair:?} has no `=`")))?;
        map.insert(decode(k)?, decode(v)?);
    }
    Ok(map)
}

/// Percent-decoding (`%2F` → `/`), as UTF-8.
fn decode(s: &str) -> Result<String, RelayError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| bad("a % in the URL is not followed by two hex digits"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad("a percent-encoded part is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get<'a>(m: &'a BTreeMap<String, String>, k: &str) -> &'a str {
        m.get(k).map(String::as_str).unwrap_or("<unset>")
    }

    #[test]
    fn url_with_everything() {
        let m = parse(
            "postgresql://relay:p%40ss%3Aw@db1.internal:5433,[::1]:5434,db3/shop%20db\
             ?sslmode=verify-full&target_session_attrs=read-write&sslrootcert=/etc/ca.pem",
        )
        .unwrap();
        assert_eq!(get(&m, "user"), "relay");
        assert_eq!(get(&m, "password"), "p@ss:w");
        assert_eq!(get(&m, "host"), "db1.internal,::1,db3");
        assert_eq!(get(&m, "port"), "5433,5434,");
        assert_eq!(get(&m, "dbname"), "shop db");
        assert_eq!(get(&m, "sslmode"), "verify-full");
        assert_eq!(get(&m, "target_session_attrs"), "read-write");
        assert_eq!(get(&m, "sslrootcert"), "/etc/ca.pem");
    }

    #[test]
    fn url_minimal() {
        let m = parse("postgres://").unwrap();
        assert!(m.is_empty(), "{m:?}");
        let m = parse("postgres://h/d").unwrap();
        assert_eq!((get(&m, "host"), get(&m, "dbname")), ("h", "d"));
        assert_eq!(get(&m, "port"), "<unset>");
    }

    #[test]
    fn key_value_with_quotes_and_escapes() {
        let m =
            parse(r"host=a,b port = 1,2  dbname='my db' password='it\'s \\x' user=u\ v").unwrap();
        assert_eq!(get(&m, "host"), "a,b");
        assert_eq!(get(&m, "port"), "1,2");
        assert_eq!(get(&m, "dbname"), "my db");
        assert_eq!(get(&m, "password"), r"it's \x");
        assert_eq!(get(&m, "user"), "u v");
    }

    #[test]
    fn errors_name_the_problem() {
        let e = parse("host=a applicaton_name=x").unwrap_err().to_string();
        assert!(
            e.contains("\"applicaton_name\" is not a libpq connection keyword"),
            "{e}"
        );
        let e = parse("host").unwrap_err().to_string();
        assert!(e.contains("expected `=`"), "{e}");
        let e = parse("password='open").unwrap_err().to_string();
        assert!(e.contains("unterminated"), "{e}");
        let e = parse("postgres://h/d?sslmode").unwrap_err().to_string();
        assert!(e.contains("has no `=`"), "{e}");
        let e = parse("postgres://u:%zz@h").unwrap_err().to_string();
        assert!(e.contains("two hex digits"), "{e}");
    }

    #[test]
    fn every_libpq_keyword_is_applied_or_ignored_by_name() {
        // as providers' consoles print them (Neon, Supabase, RDS, Azure)
        let (m, ignored) = parse_with_ignored(
            "postgresql://relay:pw@ep-x.eu.aws.neon.tech/shop?sslmode=require&channel_binding=require\
             &application_name=shop&options=-c%20statement_timeout%3D0&keepalives=1\
             &keepalives_idle=30&gssencmode=disable&target_session_attrs=read-write",
        )
        .unwrap();
        assert_eq!(get(&m, "options"), "-c statement_timeout=0");
        assert_eq!(get(&m, "target_session_attrs"), "read-write");
        assert_eq!(get(&m, "application_name"), "<unset>");
        let named: Vec<&str> = ignored
            .iter()
            .map(|w| w.split(' ').nth(1).unwrap())
            .collect();
        assert_eq!(
            named,
            [
                "application_name",
                "channel_binding",
                "gssencmode",
                "keepalives",
                "keepalives_idle"
            ]
        );
        // every keyword of libpq 18 (PQconndefaults) is accepted
        let all = "host hostaddr port dbname user password passfile require_auth channel_binding \
                   connect_timeout client_encoding options application_name \
                   fallback_application_name keepalives keepalives_idle keepalives_interval \
                   keepalives_count tcp_user_timeout replication gssencmode sslmode \
                   requiressl sslnegotiation sslcompression sslcert sslkey sslkeylogfile \
                   sslpassword sslcertmode sslrootcert sslcrl sslcrldir sslsni requirepeer \
                   ssl_min_protocol_version ssl_max_protocol_version min_protocol_version \
                   max_protocol_version krbsrvname gsslib gssdelegation service \
                   target_session_attrs load_balance_hosts scram_client_key scram_server_key \
                   oauth_issuer oauth_client_id oauth_client_secret oauth_scope";
        for key in all.split_whitespace() {
            let r = parse_with_ignored(&format!("{key}=x"));
            assert!(r.is_ok(), "{key}: {:?}", r.err().map(|e| e.to_string()));
        }
    }

    #[test]
    fn a_raw_slash_or_question_mark_in_a_password_is_refused_without_quoting_it() {
        for url in [
            "postgres://relay:sec?ret-pw@db1/shop",
            "postgres://relay:sec/ret-pw@db1/shop",
            "postgresql://relay:a/b?c@db1:5432,db2/shop?sslmode=require",
            "postgres://relay:sec?ret=pw@db1",
        ] {
            let e = parse(url).unwrap_err().to_string();
            assert!(e.contains("percent-encode"), "{url}: {e}");
            for piece in ["sec", "ret", "pw", "db1", "shop", "a/b", "relay"] {
                assert!(!e.contains(piece), "{url}: {e:?} quotes {piece:?}");
            }
        }
        // encoded, the same passwords work
        let m = parse("postgres://relay:sec%3Fret%2Fpw@db1/shop").unwrap();
        assert_eq!(get(&m, "password"), "sec?ret/pw");
        assert_eq!((get(&m, "host"), get(&m, "dbname")), ("db1", "shop"));
        // an `@` in the password itself still works (the last one ends the user info)
        let m = parse("postgres://relay:p@ss@db1/shop").unwrap();
        assert_eq!(get(&m, "password"), "p@ss");
    }
}
