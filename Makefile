# pg_outbox: `make test` and `make demo` install what they need (scripts/setup.sh), idempotently.
.PHONY: check-deploy package test test-all chaos demo demo-saga bench bench-quick setup lint install sql-edition clean

test:
	scripts/test.sh

# every test on 15 and 17, and the SQL tests plus two end-to-end relay tests on 14, 16 and 18
test-all:
	PG_SMOKE="14 16 18" scripts/test.sh

# the chaos test at 100,000 events (make test runs it at 20,000): random kills of the relay and
# ingest, PostgreSQL immediate restarts and broker pauses under load, and here also a relay paused
# while another takes over (see docs/guarantees.md, "A paused relay is fenced"); prints what was lost or doubled;
# then a live relay whose sessions are terminated while a standby takes over (tests/tests/takeover.rs)
chaos:
	PG_FULL=15 TESTS="--test chaos --test takeover" PG_OUTBOX_CHAOS_PAUSE=1 \
	    PG_OUTBOX_CHAOS_EVENTS=$${PG_OUTBOX_CHAOS_EVENTS:-100000} scripts/test.sh

demo:
	scripts/demo.sh

demo-saga:
	scripts/demo-saga.sh

# every figure, ratio, goal verdict and curve of BENCHMARKS.md (under 20 minutes on 2 cores)
bench:
	scripts/bench.sh

# the same sections at small sizes, in a few minutes; BENCHMARKS.md says its figures are quick ones
bench-quick:
	BENCH_QUICK=1 scripts/bench.sh

setup:
	scripts/setup.sh

# deploy/kubernetes against the Kubernetes schemas, the systemd unit, the image's Dockerfile and
# compose file, statically (make test runs it too)
check-deploy:
	scripts/check-deploy.sh

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings

# sql-edition/pg_outbox.sql from pg_outbox/sql (docs/sql-edition.md); make test checks it is current
sql-edition:
	scripts/sql-edition.sh

# Debian packages into target/package: postgresql-<major>-pg-outbox for each PostgreSQL installed here,
# pg-outbox-relay, and the SQL edition as a tarball (docs/install.md); release builds
package:
	scripts/package.sh

install:
	cd pg_outbox && cargo pgrx install --pg-config $${PG_CONFIG:-$$(. ../scripts/pgversions.sh && pg_config_of 15)}

clean:
	cargo clean
