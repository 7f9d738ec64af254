#!/usr/bin/env bash
# Installs what pg_outbox's build, tests and demo need, skipping whatever is already there.
# Safe to run again and again: every step checks before it installs.
#
#   Debian packages   PostgreSQL 15 server + headers, clang (pgrx bindgen), C/C++ toolchain (librdkafka)
#   cargo-pgrx        the exact version pinned for pgrx in Cargo.toml, then `cargo pgrx init --pg15`
#   tansu             the Kafka-protocol broker used by the relay tests and the demo
#   psycopg           the Python PostgreSQL client of the saga example's customer service
set -euo pipefail
cd "$(dirname "$0")/.."

PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
TANSU_VERSION=0.6.0
say() { printf 'setup: %s\n' "$*"; }
export PATH="$HOME/.cargo/bin:$PATH"

# --- Debian packages ------------------------------------------------------------------------------
packages=(postgresql-15 postgresql-server-dev-15 postgresql-contrib libclang-dev clang sudo
          build-essential pkg-config libssl-dev zlib1g-dev python3 openssl stunnel4)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # Debian starts a default cluster on 5432; the project uses its own clusters only.
    $SUDO pg_ctlcluster 15 main stop 2>/dev/null || true
else
    say "Debian packages present"
fi

# --- cargo-pgrx, same version as pgrx -------------------------------------------------------------
pgrx_version=$(sed -n 's/^pgrx = "=\([0-9.]*\)".*/\1/p' Cargo.toml)
[ -n "$pgrx_version" ] || { echo "setup: cannot read the pgrx version from Cargo.toml" >&2; exit 1; }
if cargo pgrx --version 2>/dev/null | grep -q " $pgrx_version\$"; then
    say "cargo-pgrx $pgrx_version present"
else
    say "installing cargo-pgrx $pgrx_version (a few minutes)"
    cargo install cargo-pgrx --version "=$pgrx_version" --locked --quiet
fi
if grep -qs '^pg15 = ' "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
    say "cargo pgrx already initialised for pg15"
else
    say "cargo pgrx init --pg15 $PG_CONFIG"
    cargo pgrx init --pg15 "$PG_CONFIG" >/dev/null
fi

# --- tansu broker ---------------------------------------------------------------------------------
if command -v tansu >/dev/null && tansu --version 2>/dev/null | grep -q "$TANSU_VERSION"; then
    say "tansu $TANSU_VERSION present"
else
    say "installing tansu $TANSU_VERSION (about 10 minutes on 2 cores, once)"
    cargo install tansu --version "=$TANSU_VERSION" --locked --features libsql,dynostore --quiet
fi
# --- Python client for the saga example's customer service ----------------------------------------
if python3 -c 'import psycopg' 2>/dev/null; then
    say "python psycopg present"
else
    say "installing python psycopg"
    python3 -m pip install -q --disable-pip-version-check 'psycopg[binary]>=3.1' 2>&1 | grep -v 'running pip as' || true
    python3 -c 'import psycopg'
fi
say "ready"
