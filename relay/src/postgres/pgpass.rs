//! What libpq users already have: the `PG*` environment variables and the password file
//! (`PGPASSFILE`, else `~/.pgpass`), used when the relay's own settings leave a value unset.

use std::path::{Path, PathBuf};

/// The password for (host, port, database, user) in a password file's text: the first line whose
/// fields match (`*` matches anything; `\:` and `\\` are escapes; `#` starts a comment).
pub fn lookup(text: &str, host: &str, port: u16, database: &str, user: &str) -> Option<String> {
    let port = port.to_string();
    text.lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .filter_map(fields)
        .find(|f| {
            [host, port.as_str(), database, user]
                .iter()
                .zip(f.iter())
                .all(|(want, got)| got == "*" || got == want)
        })
        .map(|f| f[4].clone())
}

/// A line's five fields, unescaped; None for a line that does not have five.
fn fields(line: &str) -> Option<[String; 5]> {
    let mut out: Vec<String> = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.last_mut()?.push(chars.next().unwrap_or('\\')),
            ':' if out.len() < 5 => out.push(String::new()),
            c => out.last_mut()?.push(c),
        }
    }
    out.try_into().ok()
}

/// The password file libpq would read: `PGPASSFILE`, else `~/.pgpass`.
pub fn path(env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    env("PGPASSFILE")
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|home| Path::new(&home).join(".pgpass")))
}

/// The password for these coordinates from the password file, if the file exists and is private
/// (libpq ignores a file that the group or others may read; so does the relay, with a warning).
pub fn password(file: &Path, host: &str, port: u16, database: &str, user: &str) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(file).ok()?;
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(
            file = %file.display(),
            "password file ignored: it must not be readable by group or others (chmod 0600)"
        );
        return None;
    }
    lookup(
        &std::fs::read_to_string(file).ok()?,
        host,
        port,
        database,
        user,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_matching_line_wins_with_wildcards_and_escapes() {
        let text = "# comment\n\
                    db.example:5432:shop:relay:first\n\
                    *:*:shop:relay:wild\\:card\\\\\n\
                    *:*:*:*:fallback\n\
                    short:line\n";
        assert_eq!(
            lookup(text, "db.example", 5432, "shop", "relay").as_deref(),
            Some("first")
        );
        assert_eq!(
            lookup(text, "other", 6543, "shop", "relay").as_deref(),
            Some("wild:card\\")
        );
        assert_eq!(
            lookup(text, "other", 1, "x", "y").as_deref(),
            Some("fallback")
        );
        assert_eq!(lookup("a:1:b:c:d\n", "a", 2, "b", "c"), None);
    }

    #[test]
    fn pgpassfile_wins_over_home() {
        let env = |k: &str| match k {
            "PGPASSFILE" => Some("/etc/relay/pgpass".to_string()),
            "HOME" => Some("/home/relay".to_string()),
            _ => None,
        };
        assert_eq!(path(&env), Some(PathBuf::from("/etc/relay/pgpass")));
        let env = |k: &str| (k == "HOME").then(|| "/home/relay".to_string());
        assert_eq!(path(&env), Some(PathBuf::from("/home/relay/.pgpass")));
    }
}
