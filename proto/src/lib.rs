//! The cluster model shared by every jai binary.
//!
//! Agents write it to etcd, `jaictl` and the lab read it back, so it lives in
//! one crate that depends on nothing but serde:
//!
//! - [`keys`]: where each piece of cluster state lives in etcd (`/jai/<cluster>/…`).
//! - [`member`]: what an agent publishes about its node under `members/<name>`.
//! - [`dynamic`]: the cluster-wide settings under `config`, with their validation.
//! - [`backup`]: the `backup` section of the config and the backup records
//!   under `backup/`.
//! - [`record`]: the small records the leader keeps under `status` and `history`.
//! - [`logging`]: the `log:` section of the daemons' configs and (feature
//!   `logging`) the subscriber it installs.
//! - [`lsn`]: PostgreSQL WAL positions, parsed and printed as PostgreSQL does.
//! - [`haproxy_cfg`]: a complete `haproxy.cfg` rendered from the members.
//! - [`patch`]: merge patches, `key=value` assignments and diffs of the config.
//!
//! This crate must never depend on etcd-client, PostgreSQL, tonic or tokio: it
//! is data (the gRPC stubs of the control API are `jai-grpc`'s), so the HA
//! core (`jai-ha`) can build on it without an async runtime.

pub mod backup;
pub mod dynamic;
pub mod haproxy_cfg;
pub mod keys;
pub mod logging;
pub mod lsn;
pub mod member;
pub mod patch;
pub mod record;

pub use backup::{
    ArchiveStatus, BackupJob, BackupSettings, DrillReport, JobKind, JobOrigin, JobResult,
};
pub use dynamic::{ConfigError, DynamicConfig, SynchronousMode};
pub use haproxy_cfg::{render_haproxy_cfg, BalancedMember, HaproxyCfgOptions};
pub use keys::ClusterKeys;
pub use lsn::Lsn;
pub use member::{MemberRole, MemberState, MemberStatus, PgPaths, StandbyLink, Tags};
pub use record::{
    HistoryEntry, LeaderStatus, RestoreIntent, RestorePhase, SwitchoverIntent, SyncState,
};
