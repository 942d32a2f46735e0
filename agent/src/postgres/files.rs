//! The files the agent writes for PostgreSQL: `postgresql.conf`, `pg_hba.conf`,
//! `standby.signal` and the passfile. Rewritten before every start, so a cloned
//! data directory never keeps its source's addresses.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Everything `postgresql.conf` depends on.
pub struct ServerSettings<'a> {
    /// `cluster_name`, shown in `ps`.
    pub member: &'a str,
    /// TCP listen address.
    pub listen_host: String,
    /// TCP port.
    pub port: u16,
    /// Directory for the Unix socket.
    pub socket_dir: &'a str,
    /// `primary_conninfo` (without password; the passfile holds it).
    pub primary_conninfo: Option<String>,
    /// `primary_slot_name`.
    pub primary_slot: Option<String>,
    /// Cluster-wide parameters from the dynamic config.
    pub parameters: &'a BTreeMap<String, String>,
    /// `synchronous_standby_names`, owned by the leader's sync rounds
    /// (a standby ignores it until it is promoted).
    pub sync_standby_names: String,
    /// WAL archive settings, when the cluster config has a `backup` section.
    pub archive: Option<ArchiveSettings>,
    /// `recovery_target_time` of a restore to a point in time (promote
    /// there); only for the start that follows the restore.
    pub recovery_target_time: Option<String>,
}

/// How PostgreSQL archives and fetches WAL (pgBackRest).
pub struct ArchiveSettings {
    /// `archive_command`; only a primary runs it (`archive_mode = on`).
    pub archive_command: String,
    /// `restore_command`, only where reading the archive is safe: a standby
    /// restored from the repository catching up to its upstream, and a
    /// restore to a point in time. Never on a streaming standby: when its
    /// upstream dies it would fall back to the archive, where the old
    /// primary's last complete segment may hold WAL past the new leader's
    /// fork, and replay it.
    pub restore_command: Option<String>,
    /// `archive_timeout`.
    pub archive_timeout: std::time::Duration,
}

/// Renders `postgresql.conf`. The parameters the agent owns come last so that
/// nothing in `postgresql.base.conf` (initdb's file) can override them.
pub fn postgresql_conf(settings: &ServerSettings) -> String {
    let mut text = String::from(
        "# Written by jai-agent before each start: edits here are lost.\n\
         # Cluster-wide parameters: the `postgresql.parameters` of the cluster config.\n\
         include_if_exists 'postgresql.base.conf'\n",
    );
    let defaults: [(&str, &str); 10] = [
        ("max_wal_senders", "10"),
        ("max_replication_slots", "10"),
        ("wal_keep_size", "128MB"),
        ("hot_standby_feedback", "on"),
        ("wal_log_hints", "on"),
        ("wal_receiver_status_interval", "1s"),
        ("wal_retrieve_retry_interval", "1s"),
        ("wal_sender_timeout", "10s"),
        ("wal_receiver_timeout", "10s"),
        ("logging_collector", "off"),
    ];
    for (name, value) in defaults {
        if !settings.parameters.contains_key(name) {
            let _ = writeln!(text, "{name} = {}", quote(value));
        }
    }
    for (name, value) in settings.parameters {
        let _ = writeln!(text, "{name} = {}", quote(value));
    }
    let owned = [
        ("cluster_name", settings.member.to_owned()),
        ("listen_addresses", settings.listen_host.clone()),
        ("port", settings.port.to_string()),
        ("unix_socket_directories", settings.socket_dir.to_owned()),
        ("wal_level", "replica".to_owned()),
        ("hot_standby", "on".to_owned()),
        ("recovery_target_timeline", "latest".to_owned()),
        (
            "primary_conninfo",
            settings.primary_conninfo.clone().unwrap_or_default(),
        ),
        (
            "primary_slot_name",
            settings.primary_slot.clone().unwrap_or_default(),
        ),
        (
            "synchronous_standby_names",
            settings.sync_standby_names.clone(),
        ),
    ];
    for (name, value) in owned {
        let _ = writeln!(text, "{name} = {}", quote(&value));
    }
    if let Some(target) = &settings.recovery_target_time {
        let _ = writeln!(text, "recovery_target_time = {}", quote(target));
        let _ = writeln!(text, "recovery_target_action = 'promote'");
    }
    if let Some(archive) = &settings.archive {
        let _ = writeln!(text, "archive_mode = 'on'");
        let _ = writeln!(
            text,
            "archive_command = {}",
            quote(&archive.archive_command)
        );
        if let Some(command) = &archive.restore_command {
            let _ = writeln!(text, "restore_command = {}", quote(command));
        }
        let _ = writeln!(
            text,
            "archive_timeout = '{}s'",
            archive.archive_timeout.as_secs().max(1)
        );
    }
    text
}

/// Renders `pg_hba.conf`: the operator's lines, then password authentication
/// for everything (SCRAM; nothing is trusted).
pub fn pg_hba_conf(extra: &[String], replication_user: &str) -> String {
    let mut text = String::from("# Written by jai-agent before each start: edits here are lost.\n");
    for line in extra {
        let _ = writeln!(text, "{line}");
    }
    let _ = writeln!(text, "local all all scram-sha-256");
    for network in ["0.0.0.0/0", "::/0"] {
        let _ = writeln!(
            text,
            "host replication {replication_user} {network} scram-sha-256"
        );
        let _ = writeln!(text, "host all all {network} scram-sha-256");
    }
    text
}

/// A libpq passfile line: `host:port:db:user:password`, with `:` and `\` escaped.
pub fn passfile_line(host: &str, port: &str, database: &str, user: &str, password: &str) -> String {
    let escape = |field: &str| field.replace('\\', "\\\\").replace(':', "\\:");
    format!(
        "{}:{}:{}:{}:{}\n",
        escape(host),
        escape(port),
        escape(database),
        escape(user),
        escape(password)
    )
}

/// Quotes a `postgresql.conf` value.
fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

/// Quotes a libpq connection-string value.
pub fn conninfo_value(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_parameters_come_last_and_are_quoted() {
        let mut parameters = BTreeMap::new();
        parameters.insert("work_mem".to_owned(), "8MB".to_owned());
        parameters.insert("wal_keep_size".to_owned(), "1GB".to_owned());
        let text = postgresql_conf(&ServerSettings {
            member: "pg1",
            listen_host: "127.0.0.1".into(),
            port: 5432,
            socket_dir: "/run/x",
            primary_conninfo: Some("host=a user='it''s'".into()),
            primary_slot: Some("jai_pg1".into()),
            parameters: &parameters,
            sync_standby_names: "FIRST 1 (\"pg2\")".into(),
            archive: Some(ArchiveSettings {
                archive_command: "pgbackrest archive-push %p".into(),
                restore_command: Some("pgbackrest archive-get %f \"%p\"".into()),
                archive_timeout: std::time::Duration::from_secs(60),
            }),
            recovery_target_time: None,
        });
        assert!(text.contains("archive_mode = 'on'"));
        assert!(text.contains("archive_timeout = '60s'"));
        assert!(text.contains("restore_command = 'pgbackrest archive-get %f \"%p\"'"));
        assert!(text.contains("synchronous_standby_names = 'FIRST 1 (\"pg2\")'"));
        assert!(text.contains("work_mem = '8MB'"));
        assert!(text.contains("wal_keep_size = '1GB'"));
        assert!(
            !text.contains("wal_keep_size = '128MB'"),
            "operator value wins"
        );
        assert!(text.contains("primary_conninfo = 'host=a user=''it''''s'''"));
        assert!(text.rfind("port = '5432'") > text.find("work_mem"));
    }

    #[test]
    fn passfile_escapes_separators() {
        assert_eq!(
            passfile_line("h", "5432", "*", "u", "a:b\\c"),
            "h:5432:*:u:a\\:b\\\\c\n"
        );
    }

    #[test]
    fn hba_trusts_nothing() {
        let text = pg_hba_conf(
            &["host all app 10.0.0.0/8 scram-sha-256".into()],
            "replicator",
        );
        assert!(!text.contains("trust"));
        assert!(text.starts_with("# Written"));
        assert!(text.contains("host replication replicator 0.0.0.0/0 scram-sha-256"));
    }
}
