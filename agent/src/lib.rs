//! `jai-agent`: supervises one PostgreSQL node and keeps it in its right role.
//!
//! The crate is split as docs/architecture.md's code map describes it
//! ("`agent/` — `jai-agent`: the daemon"): [`ha`] decides, everything else
//! acts.
//!
//! - [`ha`]: the sans-IO core. Pure functions from an observation to actions.
//! - [`clock`]: the monotonic millisecond clock the driver counts in.
//! - [`bytes`]: byte counts as Patroni writes them (`16MB`), for the file
//!   and the health API alike.
//! - [`config`]: the agent's YAML file, every section of it (`haproxy:` too),
//!   validated at load.
//! - [`dcs`]: etcd: the lease and its keepalive task, the cluster view, the
//!   guarded transactions on the leader and initialize keys.
//! - [`fence`]: self-fencing: the lease watchdog and the panic hook that
//!   stop a primary before the agent can no longer vouch for it.
//! - [`keeper`]: the fence keeper, a process of its own that fences at the
//!   same point when the agent is frozen or dead.
//! - [`postgres`]: the PostgreSQL process, its files and its queries.
//! - [`api`]: the HTTP health API HAProxy checks, and `/status`.
//! - [`listener`]: serving HTTP within bounds (header deadline, lifetime,
//!   connection cap).
//! - [`haproxy`]: pushes role changes to HAProxy's runtime API (its settings
//!   are [`config::HaproxyConfig`]).
//! - [`persisted`]: the little the core must remember across agent restarts.
//! - [`backup`]: pgBackRest: the WAL archive's settings, the backup
//!   schedule and its jobs, restore drills (a worker beside the HA loop).
//! - [`control`]: the gRPC control API `jaictl` drives (token-checked).
//! - [`shell`]: the loop that observes, calls the core and executes actions.
//!
//! `ha` must never depend on any of the others; they all may depend on `ha`'s
//! model types.

pub mod api;
pub mod backup;
pub mod bytes;
pub mod clock;
pub mod config;
pub mod control;
pub mod dcs;
pub mod fence;
pub mod haproxy;
pub mod keeper;
pub mod listener;
pub mod persisted;
pub mod postgres;
pub mod shell;

/// The sans-IO core and round driver (the `jai-ha` crate), under the name
/// the agent's modules use.
pub use jai_ha as ha;
