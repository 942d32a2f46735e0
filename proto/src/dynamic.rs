//! Cluster-wide settings, stored as JSON under `config` and shared by every member.
//!
//! The first member to bootstrap writes its `bootstrap.dcs` section here; from then
//! on etcd is the source of truth, so every agent runs with the same timings.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// Cluster-wide settings. The defaults are chosen for fast, safe failover:
/// see `docs/configuration.md` for the reasoning behind each number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DynamicConfig {
    /// Lifetime of the leader's lease. A dead leader is replaced about this long
    /// after its last renewal.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// How often an agent runs its decision loop when nothing wakes it earlier.
    #[serde(with = "humantime_serde")]
    pub loop_wait: Duration,
    /// How long one etcd or PostgreSQL request may take before it counts as failed.
    #[serde(with = "humantime_serde")]
    pub retry_timeout: Duration,
    /// A replica further behind the leader's last position than this many bytes
    /// is not eligible for promotion.
    pub maximum_lag_on_failover: u64,
    /// How long a crashed primary may take to restart in place before the leader
    /// key is released for a failover.
    #[serde(with = "humantime_serde")]
    pub primary_start_timeout: Duration,
    /// Maintenance mode: agents take no automatic action (no failover, no
    /// restart, no rewind) and say so in their status. Fencing stays on: a
    /// primary whose lease is not confirmed still stops writing.
    pub pause: bool,
    /// Whether commits wait for standbys (docs/architecture.md, "Safety
    /// invariants", §3.3): see [`SynchronousMode`].
    pub synchronous_mode: SynchronousMode,
    /// How many standbys each commit waits for in synchronous mode.
    pub synchronous_node_count: u32,
    /// A synchronous standby whose flushed position falls further behind the
    /// leader than this many bytes is replaced by a healthier one.
    pub maximum_lag_on_syncnode: u64,
    /// PostgreSQL settings every member runs with.
    pub postgresql: PostgresqlSettings,
    /// WAL archive and scheduled backups with pgBackRest (docs/backups.md);
    /// absent: neither.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup: Option<crate::backup::BackupSettings>,
}

/// Whether a commit is acknowledged only once standbys have it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SynchronousMode {
    /// Asynchronous replication: a failover may lose the last acknowledged writes.
    #[default]
    Off,
    /// Commits wait for the standbys listed in the `sync` key; only they may be
    /// promoted. With no eligible standby the leader falls back to
    /// asynchronous commits (and says so) rather than stop taking writes.
    On,
    /// Like `on`, but never falls back: with no standby, commits wait.
    Strict,
}

impl SynchronousMode {
    /// Commits may wait for standbys.
    pub fn is_on(self) -> bool {
        self != SynchronousMode::Off
    }
}

/// The PostgreSQL part of [`DynamicConfig`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresqlSettings {
    /// `postgresql.conf` parameters, written verbatim (after validation of the names).
    pub parameters: BTreeMap<String, String>,
}

impl Default for DynamicConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(4),
            loop_wait: Duration::from_secs(1),
            retry_timeout: Duration::from_millis(1500),
            maximum_lag_on_failover: 1024 * 1024,
            primary_start_timeout: Duration::from_secs(30),
            pause: false,
            synchronous_mode: SynchronousMode::Off,
            synchronous_node_count: 1,
            maximum_lag_on_syncnode: 16 * 1024 * 1024,
            postgresql: PostgresqlSettings::default(),
            backup: None,
        }
    }
}

/// A setting that breaks a rule; `field` names it the way the YAML spells it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ConfigError {
    /// The offending setting, e.g. `ttl`.
    pub field: String,
    /// What is wrong with it and what would be accepted.
    pub reason: String,
}

/// Parameters the agent owns: letting the dynamic config set them would break
/// replication or the agent's own bookkeeping.
const AGENT_OWNED_PARAMETERS: &[&str] = &[
    "cluster_name",
    "listen_addresses",
    "port",
    "unix_socket_directories",
    "hba_file",
    "ident_file",
    "data_directory",
    "config_file",
    "primary_conninfo",
    "primary_slot_name",
    "recovery_target_timeline",
    "wal_level",
    "hot_standby",
    "synchronous_standby_names",
    "archive_mode",
    "archive_command",
    "restore_command",
    "archive_timeout",
];

/// The demotion margin never exceeds this (see [`DynamicConfig::demote_margin`]).
pub const MAX_DEMOTE_MARGIN: Duration = Duration::from_millis(500);

/// etcd 3.4 grants no lease shorter than this.
pub const MIN_TTL: Duration = Duration::from_secs(2);

/// An upper bound on one timing, with the reason it exists: a typo
/// (`1000000h`) must be refused, not applied to a running cluster.
pub struct TimingBound {
    /// The setting's key.
    pub field: &'static str,
    /// Its value in a config.
    pub value: fn(&DynamicConfig) -> Duration,
    /// The longest accepted value.
    pub max: Duration,
    /// Why a longer one is refused.
    pub why: &'static str,
}

/// The longest accepted timings.
pub const MAX_TIMINGS: &[TimingBound] = &[
    TimingBound {
        field: "ttl",
        value: |config| config.ttl,
        max: Duration::from_secs(600),
        why: "a dead leader is replaced only after its lease runs out, so writes would stop that long",
    },
    TimingBound {
        field: "loop_wait",
        value: |config| config.loop_wait,
        max: Duration::from_secs(300),
        why: "the agent would notice a change only that late",
    },
    TimingBound {
        field: "retry_timeout",
        value: |config| config.retry_timeout,
        max: Duration::from_secs(300),
        why: "a hung etcd request would block the agent's round that long",
    },
    TimingBound {
        field: "primary_start_timeout",
        value: |config| config.primary_start_timeout,
        max: Duration::from_secs(3600),
        why: "a primary that cannot start would block any failover that long",
    },
];

/// The most synchronous standbys a commit may wait for.
pub const MAX_SYNCHRONOUS_NODE_COUNT: u32 = 64;

impl DynamicConfig {
    /// Checks every rule; the first broken one is returned, naming its field.
    ///
    /// The central rule is `ttl >= loop_wait + 2 * retry_timeout`: a leader must be
    /// able to miss one loop and one full retry of its renewal and still demote
    /// itself before its lease can expire (docs/architecture.md, "Safety
    /// invariants", §3.1).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let error = |field: &str, reason: String| {
            Err(ConfigError {
                field: field.to_owned(),
                reason,
            })
        };
        if self.ttl < MIN_TTL {
            return error(
                "ttl",
                format!(
                    "{} is below etcd's minimum lease of {}",
                    show(self.ttl),
                    show(MIN_TTL)
                ),
            );
        }
        for bound in MAX_TIMINGS {
            let value = (bound.value)(self);
            if value > bound.max {
                return error(
                    bound.field,
                    format!(
                        "{} is above the maximum of {}: {}",
                        show(value),
                        show(bound.max),
                        bound.why
                    ),
                );
            }
        }
        if self.loop_wait < Duration::from_millis(100) {
            return error(
                "loop_wait",
                format!("{} is below the minimum of 100ms", show(self.loop_wait)),
            );
        }
        if self.retry_timeout < Duration::from_millis(100) {
            return error(
                "retry_timeout",
                format!("{} is below the minimum of 100ms", show(self.retry_timeout)),
            );
        }
        let needed = self.loop_wait + 2 * self.retry_timeout;
        if self.ttl < needed {
            return error(
                "ttl",
                format!(
                    "{} is too small: it must be at least loop_wait + 2 * retry_timeout = {} + 2 * {} = {}",
                    show(self.ttl),
                    show(self.loop_wait),
                    show(self.retry_timeout),
                    show(needed)
                ),
            );
        }
        if self.synchronous_node_count < 1 {
            return error(
                "synchronous_node_count",
                "must be at least 1 (use synchronous_mode: off for none)".into(),
            );
        }
        if self.synchronous_node_count > MAX_SYNCHRONOUS_NODE_COUNT {
            return error(
                "synchronous_node_count",
                format!(
                    "{} is above the maximum of {MAX_SYNCHRONOUS_NODE_COUNT}",
                    self.synchronous_node_count
                ),
            );
        }
        if let Some(backup) = &self.backup {
            if let Err((field, reason)) = backup.validate() {
                return error(&format!("backup.{field}"), reason);
            }
        }
        for name in self.postgresql.parameters.keys() {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
            {
                return error(
                    &format!("postgresql.parameters.{name}"),
                    "not a PostgreSQL parameter name (letters, digits, _ and . only)".into(),
                );
            }
            if AGENT_OWNED_PARAMETERS.contains(&name.as_str()) {
                return error(
                    &format!("postgresql.parameters.{name}"),
                    "is managed by jai-agent and cannot be set here".into(),
                );
            }
        }
        Ok(())
    }

    /// How long before its lease deadline a leader must have stopped accepting
    /// writes: `retry_timeout`, at most half a second.
    ///
    /// Fencing is a signal, not a request (the agent's watchdog sends the
    /// postmaster SIGINT, which ends every session at once), so the margin only
    /// has to cover the watchdog's 50 ms poll and the sessions ending. The
    /// deadline itself is already conservative: it counts from the *send* time of
    /// the last answered keepalive, and a replica can promote only after etcd
    /// expired the lease, then saw, asked and won the race.
    pub fn demote_margin(&self) -> Duration {
        self.retry_timeout.min(MAX_DEMOTE_MARGIN)
    }
}

fn show(duration: Duration) -> String {
    humantime_serde::re::humantime::format_duration(duration).to_string()
}

#[cfg(test)]
mod bounds {
    use super::*;

    #[test]
    fn absurd_timings_are_refused_with_the_field_and_the_reason() {
        let config = DynamicConfig {
            ttl: Duration::from_secs(1_000_000 * 3600),
            ..DynamicConfig::default()
        };
        let error = config.validate().unwrap_err();
        assert_eq!(error.field, "ttl");
        assert!(
            error.reason.contains("above the maximum of 10m"),
            "{}",
            error.reason
        );
        for bound in MAX_TIMINGS {
            // Set through the config's own key, so the table names real keys.
            let mut json = serde_json::to_value(DynamicConfig {
                ttl: Duration::from_secs(600),
                ..DynamicConfig::default()
            })
            .unwrap();
            json[bound.field] = serde_json::Value::String(show(bound.max + Duration::from_secs(1)));
            let config: DynamicConfig = serde_json::from_value(json).unwrap();
            assert!((bound.value)(&config) > bound.max, "{}", bound.field);
            assert_eq!(config.validate().unwrap_err().field, bound.field);
        }
    }

    #[test]
    fn the_bounds_themselves_are_accepted() {
        let config = DynamicConfig {
            ttl: Duration::from_secs(600),
            loop_wait: Duration::from_secs(10),
            retry_timeout: Duration::from_secs(10),
            primary_start_timeout: Duration::from_secs(3600),
            ..DynamicConfig::default()
        };
        assert!(config.validate().is_ok());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        DynamicConfig::default().validate().unwrap();
    }

    #[test]
    fn ttl_must_cover_a_loop_and_two_retries() {
        let config = DynamicConfig {
            ttl: Duration::from_secs(4),
            loop_wait: Duration::from_secs(1),
            retry_timeout: Duration::from_secs(2),
            ..DynamicConfig::default()
        };
        let error = config.validate().unwrap_err();
        assert_eq!(error.field, "ttl");
        assert!(error.reason.contains("1s + 2 * 2s = 5s"), "{error}");
    }

    #[test]
    fn ttl_below_etcd_minimum_is_refused() {
        let config = DynamicConfig {
            ttl: Duration::from_secs(1),
            loop_wait: Duration::from_millis(100),
            retry_timeout: Duration::from_millis(100),
            ..DynamicConfig::default()
        };
        assert_eq!(config.validate().unwrap_err().field, "ttl");
    }

    #[test]
    fn agent_owned_parameters_are_refused() {
        let mut config = DynamicConfig::default();
        config
            .postgresql
            .parameters
            .insert("port".into(), "5432".into());
        let error = config.validate().unwrap_err();
        assert_eq!(error.field, "postgresql.parameters.port");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let error = serde_json::from_str::<DynamicConfig>(r#"{"tll":"5s"}"#).unwrap_err();
        assert!(error.to_string().contains("unknown field `tll`"), "{error}");
    }
}
