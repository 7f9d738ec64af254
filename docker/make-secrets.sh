#!/usr/bin/env bash
# Writes the secrets compose.yml reads, with random passwords, into docker/secrets/ (kept out of git
# by docker/.gitignore). Files that exist are kept, so running it again changes nothing; to change a
# password after the first `up`, see docker/README.md.
#   docker/make-secrets.sh
set -euo pipefail

dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/secrets"
mkdir -p "$dir"
# Other users of this machine may not enter the directory. The files themselves stay readable
# (0644): compose bind-mounts them with these modes, and the postgres container's init script
# reads relay_pgpass as user postgres (the relay copies it to a private 0600 file at start).
chmod 0700 "$dir"

random() {
    if command -v openssl >/dev/null; then
        openssl rand -hex 32
    else
        od -An -N32 -tx1 /dev/urandom | tr -d ' \n'
        echo
    fi
}

# write NAME CONTENT: create docker/secrets/NAME unless it exists, and say which
write() {
    if [ -e "$dir/$1" ]; then
        echo "kept    $dir/$1"
    else
        (umask 022 && printf '%s\n' "$2" > "$dir/$1")
        echo "created $dir/$1"
    fi
}

# the superuser's password (POSTGRES_PASSWORD_FILE); only for you, the relay never uses it
write postgres_password "$(random)"
# the relay's libpq password file (PGPASSFILE): host:port:database:user:password
write relay_pgpass "*:*:*:relay:$(random)"
