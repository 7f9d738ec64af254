//! PostgreSQL client plumbing, used by the sources, the dead letters, ingest and `check`/`status`:
//! connection settings as libpq users write them ([`conninfo`], [`pgpass`], the `PG*` variables),
//! resolved once into a [`PgConfig`] ([`config`]), TLS as `sslmode` says ([`tls`]), and one way to
//! open a session ([`session`]). Nothing here knows the relay's other settings or its loop.

pub mod config;
pub mod conninfo;
pub mod pgpass;
pub mod session;
pub mod tls;

pub use config::{Given, PgConfig, PgEndpoint};
pub use session::{application_name, connect, connect_at, open, Driver, HOLDER_SQL, SEARCH_PATH};
