//! The command line, as clap definitions. Also the source of the man page and
//! the shell completions, so they can never disagree with what `jaictl` parses.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// Operate a jai cluster: status, switchover, failover, maintenance, config.
///
/// Reads the cluster's state from etcd; changes it through the agents' control
/// API with the cluster's control token. Exit codes: 0 success, 1 refused or
/// failed, 2 usage or configuration error, 3 cluster unreachable.
#[derive(Debug, Parser)]
#[command(name = "jaictl", version, propagate_version = true)]
pub struct Cli {
    /// Config file [default: $JAICTL_CONFIG, else ~/.config/jai/jaictl.yaml].
    #[arg(short, long, global = true, env = "JAICTL_CONFIG")]
    pub config: Option<PathBuf>,
    /// etcd client URLs, comma-separated; override the config file's.
    #[arg(long, global = true, value_delimiter = ',', value_name = "URL")]
    pub etcd: Vec<String>,
    /// Cluster name; overrides the config file's.
    #[arg(long, global = true)]
    pub cluster: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Members, roles, lag, maintenance mode and any pending switchover.
    #[command(visible_alias = "list")]
    Status(StatusArgs),
    /// The replication tree: the leader and who streams from it.
    Topology,
    /// Every promotion: timeline, LSN, reason, time, new leader.
    History(OutputArgs),
    /// Planned, graceful handover from the leader to a replica.
    Switchover(SwitchoverArgs),
    /// Promote a member when no healthy leader exists.
    Failover(FailoverArgs),
    /// Restart PostgreSQL on one member, or on every member of a role.
    Restart(RestartArgs),
    /// Wipe a replica's data directory and clone it again from the leader.
    Reinit(ReinitArgs),
    /// Rewrite PostgreSQL's settings from the cluster config and reload them.
    Reload(ReloadArgs),
    /// Maintenance mode on: agents take no automatic action.
    Pause,
    /// Maintenance mode off: automatic failover is back.
    Resume,
    /// Show or change the cluster-wide config.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// A connection string for the primary or a replica.
    Dsn(DsnArgs),
    /// Print a complete haproxy.cfg for the cluster's registered members.
    HaproxyConfig(HaproxyConfigArgs),
    /// Backups with pgBackRest: take one, list them, verify them.
    #[command(subcommand)]
    Backup(BackupCommand),
    /// Bring the whole cluster back to a point in time, in place.
    Restore(RestoreArgs),
    /// Print shell completions.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff).
    Man,
}

/// Output format of the reading commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
    Table,
    /// JSON for programs.
    Json,
    /// YAML for people and programs.
    Yaml,
}

/// `-o FORMAT`.
#[derive(Debug, Args)]
pub struct OutputArgs {
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

/// `jaictl status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Output format.
    #[command(flatten)]
    pub output: OutputArgs,
    /// Print again every SECS seconds until interrupted.
    #[arg(short, long, value_name = "SECS")]
    pub watch: Option<f64>,
}

/// `jaictl switchover`.
#[derive(Debug, Args)]
pub struct SwitchoverArgs {
    /// The current leader (checked: refused if it is not).
    #[arg(long, value_name = "MEMBER")]
    pub from: Option<String>,
    /// The member to take over [default: the best streaming replica].
    #[arg(long, value_name = "MEMBER")]
    pub to: Option<String>,
    /// When: RFC 3339 (2026-11-27T05:00:00Z) or a delay (+10m).
    #[arg(long, value_name = "TIME", conflicts_with = "cancel")]
    pub at: Option<String>,
    /// Do not ask for confirmation; also accept a lagging target.
    #[arg(long)]
    pub force: bool,
    /// Cancel the pending switchover instead.
    #[arg(long)]
    pub cancel: bool,
    /// How long to wait for the outcome of an immediate switchover.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub wait: std::time::Duration,
}

/// `jaictl failover`.
#[derive(Debug, Args)]
pub struct FailoverArgs {
    /// The member to promote.
    #[arg(long, value_name = "MEMBER")]
    pub to: String,
    /// Do not ask for confirmation; accept a target behind the last leader.
    #[arg(long)]
    pub force: bool,
    /// How long to wait for the new leader.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub wait: std::time::Duration,
}

/// Which members a command applies to by role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoleFilter {
    /// The leader.
    Primary,
    /// Every member but the leader.
    Replica,
    /// Every member.
    Any,
}

/// `jaictl restart`.
#[derive(Debug, Args)]
pub struct RestartArgs {
    /// The member to restart.
    #[arg(required_unless_present = "role", conflicts_with = "role")]
    pub member: Option<String>,
    /// Restart every member of this role, one at a time.
    #[arg(long, value_enum)]
    pub role: Option<RoleFilter>,
    /// Only where a changed setting waits for a restart.
    #[arg(long)]
    pub pending: bool,
    /// Do not ask for confirmation.
    #[arg(long)]
    pub force: bool,
}

/// `jaictl reinit`.
#[derive(Debug, Args)]
pub struct ReinitArgs {
    /// The replica to wipe and clone again.
    pub member: String,
    /// Do not ask for confirmation.
    #[arg(long)]
    pub force: bool,
}

/// `jaictl reload`.
#[derive(Debug, Args)]
pub struct ReloadArgs {
    /// Only this member [default: every member].
    pub member: Option<String>,
}

/// `jaictl config …`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the cluster config.
    Show(OutputArgs),
    /// Edit the cluster config in $EDITOR; validated, diffed, confirmed.
    Edit {
        /// Do not ask for confirmation.
        #[arg(long)]
        force: bool,
    },
    /// Set settings: `ttl=10s`, `postgresql.parameters.work_mem=8MB`,
    /// `KEY=null` resets one to its default.
    Set {
        /// KEY=VALUE assignments.
        #[arg(required = true, value_name = "KEY=VALUE")]
        assignments: Vec<String>,
        /// Do not ask for confirmation.
        #[arg(long)]
        force: bool,
    },
}

/// `jaictl backup …`.
#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Take a backup now (the leader picks the member) and wait for it.
    Create {
        /// What to copy: everything, changes since the last full backup,
        /// or since the last backup of any type (a full one when none exists).
        #[arg(long = "type", value_enum, default_value_t = BackupType::Incr)]
        kind: BackupType,
        /// How long to wait for the result.
        #[arg(long, value_name = "DURATION", default_value = "2h", value_parser = humantime::parse_duration)]
        wait: std::time::Duration,
    },
    /// The backups in the repository, with their WAL range and whether the
    /// last restore drill verified them.
    List(OutputArgs),
    /// `pgbackrest verify` and a restore drill of the latest backup: restored
    /// into a scratch directory, recovered, checked, counted, removed.
    Verify {
        /// How long to wait for the result.
        #[arg(long, value_name = "DURATION", default_value = "2h", value_parser = humantime::parse_duration)]
        wait: std::time::Duration,
    },
}

/// `jaictl restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The target: RFC 3339 (`2026-12-03T14:02:00Z`; without an offset, UTC)
    /// or a time ago (`-10m`).
    #[arg(
        long,
        value_name = "TIME",
        required_unless_present = "abort",
        allow_hyphen_values = true
    )]
    pub time: Option<String>,
    /// Do not ask for confirmation.
    #[arg(long)]
    pub force: bool,
    /// Remove a pending restore that has not restored yet.
    #[arg(long, conflicts_with = "time")]
    pub abort: bool,
    /// How long to wait for the cluster to be back.
    #[arg(long, value_name = "DURATION", default_value = "30m", value_parser = humantime::parse_duration)]
    pub wait: std::time::Duration,
}

/// `jaictl backup create --type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackupType {
    /// Everything.
    Full,
    /// Changes since the last full backup.
    Diff,
    /// Changes since the last backup.
    Incr,
}

impl BackupType {
    /// The name the control API takes.
    pub fn name(self) -> &'static str {
        match self {
            BackupType::Full => "full",
            BackupType::Diff => "diff",
            BackupType::Incr => "incr",
        }
    }
}

/// `jaictl dsn`.
#[derive(Debug, Args)]
pub struct DsnArgs {
    /// Whose address.
    #[arg(long, value_enum, default_value_t = DsnRole::Primary)]
    pub role: DsnRole,
    /// Database name to put in the string.
    #[arg(long, default_value = "postgres")]
    pub dbname: String,
    /// User name to put in the string.
    #[arg(long)]
    pub user: Option<String>,
}

/// `jaictl dsn --role`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DsnRole {
    /// The leader.
    Primary,
    /// A running replica (the least lagging).
    Replica,
}

/// `jaictl haproxy-config`.
#[derive(Debug, Args)]
pub struct HaproxyConfigArgs {
    /// Where the write listener binds (routed to the primary).
    #[arg(long, value_name = "HOST:PORT", default_value = "0.0.0.0:5000")]
    pub write_port: String,
    /// Where the read listener binds (balanced over the replicas).
    #[arg(long, value_name = "HOST:PORT", default_value = "0.0.0.0:5001")]
    pub read_port: String,
    /// The admin runtime API the agents push to: a Unix path or HOST:PORT.
    #[arg(long, value_name = "SOCKET", default_value = "/run/haproxy/admin.sock")]
    pub stats_socket: String,
    /// Health-check interval; set the agents' `haproxy.check_interval` to the same.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = humantime::parse_duration)]
    pub check_interval: std::time::Duration,
    /// Read listener check: `/replica?lag=BYTES`; set the agents'
    /// `haproxy.max_read_lag` to the same.
    #[arg(long, value_name = "BYTES", default_value_t = 1 << 20)]
    pub max_read_lag: u64,
    /// Name of the write listener (the agents' `haproxy.write_backend`).
    #[arg(long, value_name = "NAME", default_value = "jai_write")]
    pub write_backend: String,
    /// Name of the read listener (the agents' `haproxy.read_backend`).
    #[arg(long, value_name = "NAME", default_value = "jai_read")]
    pub read_backend: String,
}
