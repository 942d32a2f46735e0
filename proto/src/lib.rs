//! The cluster model shared by every jai binary.
//!
//! Agents write it to etcd, `jaictl` and the lab read it back, so it lives in
//! one crate that depends on nothing but serde:
//!
//! - [`keys`]: where each piece of cluster state lives in etcd (`/jai/<cluster>/…`).
//! - [`member`]: what an agent publishes about its node under `members/<name>`.
//! - [`dynamic`]: the cluster-wide settings under `config`, with their validation.
//! - [`record`]: the small records the leader keeps under `status` and `history`.
//! - [`lsn`]: PostgreSQL WAL positions, parsed and printed as PostgreSQL does.
//!
//! This crate must never depend on tokio, etcd-client or PostgreSQL: it is pure data.

pub mod dynamic;
pub mod keys;
pub mod lsn;
pub mod member;
pub mod record;

pub use dynamic::{ConfigError, DynamicConfig};
pub use keys::ClusterKeys;
pub use lsn::Lsn;
pub use member::{MemberRole, MemberState, MemberStatus, Tags};
pub use record::{HistoryEntry, LeaderStatus};
