//! `jai-app`: the JAI voting site, kept online by the jai cluster.
//!
//! Two listeners share one [`state::App`]: the public site (polls, votes,
//! results) and the admin interface (its own port; login, poll editing,
//! statistics, degraded mode, `/metrics`). Writes go through HAProxy's write
//! port and are retried through a failover; anything two app nodes must
//! agree on lives in PostgreSQL or in signed cookies (docs/app.md).
//!
//! Layout, one concern per module:
//!
//! | module | concern |
//! | --- | --- |
//! | [`config`] | the YAML file, its validation and the secrets |
//! | [`auth`] | the admin password hash (argon2) |
//! | [`signing`] | HMAC for cookies and CSRF tokens |
//! | [`db`] | pools, transient-error classification, retry with backoff |
//! | [`schema`] | versioned migrations, the `jai_vote` function |
//! | [`store`], [`admin_store`] | the queries of the public site and of the admin |
//! | [`validate`] | form input checks and their messages |
//! | [`cache`] | short time-to-live cache that serves stale data on errors |
//! | [`views`] | view counting in memory, flushed in idempotent batches |
//! | [`ratelimit`] | per-node token buckets |
//! | [`metrics`] | Prometheus registry and request tracking |
//! | [`http`] | responses with cache policy and security headers, cookies, forms |
//! | [`forwarded`] | the client's address: `X-Forwarded-For` from trusted proxies only |
//! | [`listener`] | connection timeouts and the connection cap of both listeners |
//! | [`pages`], [`admin_pages`], [`chart`] | HTML (maud, escaped) and the SVG chart |
//! | [`public`], [`admin`] | the two routers' handlers |
//! | [`state`] | shared state and degraded mode |
//! | [`server`] | listeners, background tasks, orderly shutdown |

pub mod admin;
pub mod admin_pages;
pub mod admin_store;
pub mod auth;
pub mod cache;
pub mod chart;
pub mod config;
pub mod db;
pub mod forwarded;
pub mod http;
pub mod listener;
pub mod metrics;
pub mod pages;
pub mod pipelined;
pub mod public;
pub mod ratelimit;
pub mod schema;
pub mod server;
pub mod signing;
pub mod state;
pub mod store;
#[cfg(test)]
pub mod testing;
pub mod validate;
pub mod views;
