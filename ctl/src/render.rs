//! What `jaictl` prints: the status table and its JSON/YAML twin, the
//! topology tree, the history. Short, aligned, and the same facts in every format.

use crate::cli::Format;
use crate::cluster::ClusterState;
use crate::error::CtlError;
use comfy_table::presets::UTF8_BORDERS_ONLY;
use comfy_table::{Cell, ContentArrangement, Table};
use jai_proto::{MemberRole, MemberStatus};
use serde::Serialize;

/// One row of `jaictl status`.
#[derive(Debug, Clone, Serialize)]
pub struct MemberRow {
    /// Member name.
    pub member: String,
    /// PostgreSQL `host:port`.
    pub host: String,
    /// `Leader`, `Sync Standby`, `Replica`, or `-` when nothing runs.
    pub role: String,
    /// `running`, `streaming`, `not streaming`, `stopped`, `starting`…
    pub state: String,
    /// Timeline.
    pub timeline: Option<u32>,
    /// Leader: its write position; replica: what it received.
    pub lsn: Option<String>,
    /// Replica: what it replayed.
    pub replay_lsn: Option<String>,
    /// Bytes behind the leader.
    pub lag_bytes: Option<u64>,
    /// Replay lag in milliseconds, as the leader measures it.
    pub lag_ms: Option<u64>,
    /// Why the member is in its state, when it says.
    pub reason: Option<String>,
    /// Tags that change what the member may do.
    pub tags: Vec<String>,
}

/// `jaictl status` as data.
#[derive(Debug, Clone, Serialize)]
pub struct StatusView {
    /// The cluster's name.
    pub cluster: String,
    /// Its system identifier.
    pub system_id: Option<String>,
    /// The leader, if any.
    pub leader: Option<String>,
    /// Maintenance mode.
    pub paused: bool,
    /// A pending switchover, in words.
    pub pending_switchover: Option<String>,
    /// A whole-cluster restore under way, in words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore: Option<String>,
    /// `off`, `on` or `strict`.
    pub synchronous_mode: String,
    /// The leader's synchronous standbys (the `sync` key).
    pub sync_standbys: Vec<String>,
    /// One row per member.
    pub members: Vec<MemberRow>,
    /// Backups in a line each (absent: the cluster has no `backup` section).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupLines>,
}

/// The backup lines of `jaictl status`.
#[derive(Debug, Clone, Serialize)]
pub struct BackupLines {
    /// The last backup job, in words.
    pub last_backup: String,
    /// The last restore drill, in words.
    pub last_verify: String,
    /// The job running now, in words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub running: Option<String>,
    /// The WAL archive, in words.
    pub archive: String,
}

/// Builds the status rows from the cluster state.
pub fn status_view(state: &ClusterState) -> StatusView {
    StatusView {
        cluster: state.cluster.clone(),
        system_id: state.system_id.clone(),
        leader: state.leader.clone(),
        paused: state.config.pause,
        pending_switchover: state.switchover.as_ref().map(|intent| intent.describe()),
        restore: state.restore.as_ref().map(|intent| intent.describe()),
        synchronous_mode: serde_json::to_value(state.config.synchronous_mode)
            .ok()
            .and_then(|mode| mode.as_str().map(str::to_owned))
            .unwrap_or_default(),
        sync_standbys: state
            .members
            .iter()
            .filter(|member| state.is_sync_standby(&member.name))
            .map(|member| member.name.clone())
            .collect(),
        members: state
            .members
            .iter()
            .map(|member| member_row(state, member))
            .collect(),
        backup: state.config.backup.as_ref().map(|_| BackupLines {
            last_backup: state
                .last_backup
                .as_ref()
                .map_or_else(|| "none yet".to_owned(), describe_result),
            last_verify: state
                .last_verify
                .as_ref()
                .map_or_else(|| "never".to_owned(), describe_result),
            archive: state.archive.as_ref().map_or_else(
                || "not reported yet".to_owned(),
                |archive| {
                    let wal = |wal: &Option<String>, at: Option<u64>| {
                        format!(
                            "{} at {}",
                            wal.as_deref().unwrap_or("?"),
                            at.map_or_else(|| "?".into(), format_unix)
                        )
                    };
                    if archive.failing {
                        format!(
                            "FAILING on {}: last push failed {}; last archived {} (docs/runbook.md)",
                            archive.member,
                            wal(&archive.last_failed_wal, archive.last_failed_at),
                            wal(&archive.last_archived_wal, archive.last_archived_at)
                        )
                    } else {
                        format!(
                            "ok, last archived {}",
                            wal(&archive.last_archived_wal, archive.last_archived_at)
                        )
                    }
                },
            ),
            running: state.backup_job.as_ref().map(|job| {
                format!(
                    "{} job {} {} on {}",
                    job.kind,
                    job.id,
                    if job.started_at.is_some() {
                        "running"
                    } else {
                        "waiting"
                    },
                    job.member.as_deref().unwrap_or("(unassigned)")
                )
            }),
        }),
    }
}

/// One job result in a line: what, where, when, how it went.
pub fn describe_result(result: &jai_proto::JobResult) -> String {
    let took = result.finished_at.saturating_sub(result.started_at);
    let what = match (&result.label, result.kind) {
        (Some(label), jai_proto::JobKind::Verify) => format!("verify of {label}"),
        (Some(label), kind) => format!("{kind} {label}"),
        (None, kind) => kind.to_string(),
    };
    let outcome = if result.ok {
        let rpo = result
            .drill
            .as_ref()
            .and_then(|drill| drill.rpo_seconds)
            .map(|rpo| format!(", RPO {rpo:.1} s"))
            .unwrap_or_default();
        format!("ok in {took} s{rpo}")
    } else {
        format!("FAILED: {}", result.problem.as_deref().unwrap_or("unknown"))
    };
    format!(
        "{what} on {} at {}: {outcome}",
        result.member,
        format_unix(result.finished_at)
    )
}

fn member_row(state: &ClusterState, member: &MemberStatus) -> MemberRow {
    let is_leader = state.leader.as_deref() == Some(member.name.as_str());
    let link = state
        .leader_member()
        .and_then(|leader| leader.standbys.iter().find(|link| link.name == member.name));
    let role = match member.role {
        _ if is_leader => "Leader",
        MemberRole::Primary => "Primary (no key)",
        MemberRole::Replica if state.is_sync_standby(&member.name) => "Sync Standby",
        MemberRole::Replica => "Replica",
        MemberRole::Unknown => "-",
    };
    let running = member.state == jai_proto::MemberState::Running;
    let state_text = match (member.role, link) {
        (MemberRole::Replica, Some(link)) if running => link.state.clone(),
        // It says so itself: out of the read port until it streams again.
        (MemberRole::Replica, None) if running && member.streaming == Some(false) => {
            "not streaming".to_owned()
        }
        _ => format!("{:?}", member.state).to_lowercase(),
    };
    let replica = member.role == MemberRole::Replica;
    let lsn = if replica {
        member.receive_lsn
    } else {
        member.write_lsn
    };
    let mut tags = Vec::new();
    if member.tags.nofailover {
        tags.push("nofailover".into());
    }
    if member.tags.noloadbalance {
        tags.push("noloadbalance".into());
    }
    if member.tags.nosync {
        tags.push("nosync".into());
    }
    if member.tags.failover_priority > 0 {
        tags.push(format!("priority={}", member.tags.failover_priority));
    }
    if member.standing_down {
        tags.push("standing-down".into());
    }
    MemberRow {
        member: member.name.clone(),
        host: member.pg_address.clone(),
        role: role.into(),
        state: state_text,
        timeline: member.timeline,
        lsn: lsn.map(|lsn| lsn.to_string()),
        replay_lsn: member.replay_lsn.filter(|_| replica).map(|l| l.to_string()),
        lag_bytes: state
            .leader_position()
            .zip(member.wal_position())
            .filter(|_| replica)
            .map(|(leader, position)| leader.bytes_since(position)),
        lag_ms: link.and_then(|link| link.replay_lag_ms),
        reason: member.reason.clone(),
        tags,
    }
}

/// Prints `value` as JSON or YAML; `None` for the table format.
pub fn structured<T: Serialize>(value: &T, format: Format) -> Result<Option<String>, CtlError> {
    let text = match format {
        Format::Table => return Ok(None),
        Format::Json => serde_json::to_string_pretty(value)
            .map_err(|error| CtlError::Refused(format!("cannot print JSON: {error}")))?,
        Format::Yaml => serde_saphyr::to_string(value)
            .map_err(|error| CtlError::Refused(format!("cannot print YAML: {error}")))?,
    };
    Ok(Some(text.trim_end().to_owned()))
}

/// The status table with its header and footer lines.
pub fn status_table(view: &StatusView) -> String {
    let mut out = format!(
        "Cluster: {} (system {})\n",
        view.cluster,
        view.system_id.as_deref().unwrap_or("not bootstrapped yet")
    );
    let mut table = new_table([
        "Member",
        "Host",
        "Role",
        "State",
        "TL",
        "LSN",
        "Replay LSN",
        "Lag",
        "Lag time",
        "Note",
    ]);
    for row in &view.members {
        let note = row
            .tags
            .iter()
            .cloned()
            .chain(row.reason.clone())
            .collect::<Vec<_>>()
            .join("; ");
        table.add_row([
            row.member.clone(),
            row.host.clone(),
            row.role.clone(),
            row.state.clone(),
            opt(row.timeline),
            row.lsn.clone().unwrap_or_default(),
            row.replay_lsn.clone().unwrap_or_default(),
            row.lag_bytes.map(bytes).unwrap_or_default(),
            row.lag_ms.map(|ms| format!("{ms} ms")).unwrap_or_default(),
            note,
        ]);
    }
    out.push_str(&table.to_string());
    out.push('\n');
    if view.leader.is_none() {
        out.push_str("No leader: writes are refused until a member takes the leader key.\n");
    }
    if view.paused {
        out.push_str("Maintenance mode: on (no automatic failover; `jaictl resume` ends it)\n");
    }
    if view.synchronous_mode != "off" {
        let standbys = if view.sync_standbys.is_empty() {
            match view.synchronous_mode.as_str() {
                "strict" => "none: commits wait until a standby streams".to_owned(),
                _ => "none: running asynchronously, no automatic failover".to_owned(),
            }
        } else {
            view.sync_standbys.join(", ")
        };
        out.push_str(&format!(
            "Synchronous mode: {} (synchronous standbys: {standbys})\n",
            view.synchronous_mode
        ));
    }
    if let Some(pending) = &view.pending_switchover {
        out.push_str(&format!("Pending switchover: {pending}\n"));
    }
    if let Some(restore) = &view.restore {
        out.push_str(&format!("Restore: {restore}\n"));
    }
    if let Some(backup) = &view.backup {
        out.push_str(&format!("Last backup: {}\n", backup.last_backup));
        out.push_str(&format!("Last verify: {}\n", backup.last_verify));
        out.push_str(&format!("WAL archive: {}\n", backup.archive));
        if let Some(running) = &backup.running {
            out.push_str(&format!("Backup job: {running}\n"));
        }
    }
    out.trim_end().to_owned()
}

/// The replication tree: the leader, then who streams from it.
pub fn topology(state: &ClusterState) -> String {
    let view = status_view(state);
    let mut lines = Vec::new();
    let leader = view
        .members
        .iter()
        .find(|row| Some(&row.member) == view.leader.as_ref());
    match leader {
        Some(row) => lines.push(format!(
            "{} ({}) {} {}",
            row.member, row.host, row.role, row.state
        )),
        None => lines.push("(no leader)".into()),
    }
    let others: Vec<&MemberRow> = view
        .members
        .iter()
        .filter(|row| Some(&row.member) != view.leader.as_ref())
        .collect();
    for (index, row) in others.iter().enumerate() {
        let branch = if index + 1 == others.len() {
            "└─"
        } else {
            "├─"
        };
        let lag = row
            .lag_bytes
            .map(|lag| format!(", lag {}", bytes(lag)))
            .unwrap_or_default();
        lines.push(format!(
            "{branch} {} ({}) {} {}{lag}",
            row.member, row.host, row.role, row.state
        ));
    }
    lines.join("\n")
}

/// `jaictl history` as a table.
pub fn history_table(history: &[jai_proto::HistoryEntry]) -> String {
    if history.is_empty() {
        return "No promotion recorded yet.".into();
    }
    let mut table = new_table(["TL", "LSN", "Time", "New leader", "Reason"]);
    for entry in history {
        table.add_row([
            entry.timeline.to_string(),
            entry.lsn.to_string(),
            format_unix(entry.time_unix),
            entry.new_leader.clone(),
            entry.reason.clone(),
        ]);
    }
    table.to_string()
}

fn new_table<const N: usize>(header: [&str; N]) -> Table {
    let mut table = Table::new();
    table
        .load_style(UTF8_BORDERS_ONLY)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.map(Cell::new));
    table
}

/// Seconds since the epoch as RFC 3339 UTC.
pub fn format_unix(seconds: u64) -> String {
    jai_proto::record::format_unix(seconds)
}

fn opt(value: Option<u32>) -> String {
    value.map(|v| v.to_string()).unwrap_or_default()
}

/// Bytes in a unit an operator reads at a glance.
pub fn bytes(count: u64) -> String {
    match count {
        0..1024 => format!("{count} B"),
        1024..1_048_576 => format!("{:.1} KiB", count as f64 / 1024.0),
        1_048_576..1_073_741_824 => format!("{:.1} MiB", count as f64 / 1_048_576.0),
        _ => format!("{:.2} GiB", count as f64 / 1_073_741_824.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_read_at_a_glance() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(2048), "2.0 KiB");
        assert_eq!(bytes(3 * 1_048_576), "3.0 MiB");
    }
}
