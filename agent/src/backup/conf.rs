//! pgBackRest's configuration file and the command lines PostgreSQL runs
//! (`archive_command`, `restore_command`), rendered from the cluster's
//! `backup` section and this member's paths.
//!
//! Every member renders its own file (`<state_dir>/pgbackrest.conf`): `pg1` is
//! always this member's PostgreSQL; a standby that may back up adds the
//! primary as `pg2`, because pgBackRest's backup from a standby starts and
//! stops the backup on the primary and copies its few unreplicated files.

use jai_proto::BackupSettings;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The config file's name in the agent's state directory.
pub const CONF_FILE: &str = "pgbackrest.conf";

/// How this member calls pgBackRest: the program, its config file, the stanza.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// The `pgbackrest` program.
    pub program: PathBuf,
    /// This member's rendered config file.
    pub config: PathBuf,
    /// The cluster's stanza.
    pub stanza: String,
}

impl Invocation {
    /// This member's invocation for the cluster's `backup` section.
    pub fn new(program: &Path, state_dir: &Path, settings: &BackupSettings) -> Self {
        Self {
            program: program.to_owned(),
            config: state_dir.join(CONF_FILE),
            stanza: settings.stanza.clone(),
        }
    }

    fn prefix(&self) -> String {
        format!(
            "{} --config={} --stanza={}",
            shell_quote(&self.program.to_string_lossy()),
            shell_quote(&self.config.to_string_lossy()),
            shell_quote(&self.stanza)
        )
    }

    /// `archive_command`: pushes one finished WAL file. pgBackRest accepts a
    /// file already archived with the same contents, so a new primary that
    /// archives the old timeline's last segment again does not fail.
    pub fn archive_command(&self) -> String {
        format!("{} archive-push \"%p\"", self.prefix())
    }

    /// `restore_command`: fetches one WAL file (or timeline history) from the archive.
    pub fn restore_command(&self) -> String {
        format!("{} archive-get %f \"%p\"", self.prefix())
    }

    /// `restore_command` for a server on another data directory than `pg1`'s
    /// (a restored copy): pgBackRest resolves PostgreSQL's relative `%p`
    /// against `pg1-path`, so without this it would write into this
    /// member's own `pg_wal`.
    pub fn restore_command_into(&self, data_dir: &Path) -> String {
        format!(
            "{} --pg1-path={} archive-get %f \"%p\"",
            self.prefix(),
            shell_quote(&data_dir.to_string_lossy())
        )
    }
}

/// A PostgreSQL server as pgBackRest reaches it: files and Unix socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// Its data directory.
    pub data_dir: String,
    /// Its port (names its socket file).
    pub port: u16,
    /// The directory of its socket.
    pub socket_dir: String,
}

/// Everything the config file depends on.
pub struct ConfInputs<'a> {
    /// The cluster's `backup` section.
    pub settings: &'a BackupSettings,
    /// The agent's state directory (pgBackRest's log and lock directories live under it).
    pub state_dir: &'a Path,
    /// The database superuser pgBackRest connects as (its password comes
    /// from the passfile in `PGPASSFILE`).
    pub superuser: &'a str,
    /// This member's server.
    pub own: Server,
    /// The primary, when this member is a standby on the primary's host.
    pub primary: Option<Server>,
}

/// Renders `pgbackrest.conf`.
pub fn render(inputs: &ConfInputs) -> String {
    let settings = inputs.settings;
    let dir = inputs.state_dir.join("pgbackrest");
    let mut text = String::from("# Written by jai-agent from the cluster config's `backup` section: edits here are lost.\n[global]\n");
    let global = [
        (
            "repo1-path",
            settings.repo_path.to_string_lossy().into_owned(),
        ),
        ("repo1-retention-full", settings.retention_full.to_string()),
        ("process-max", settings.process_max.to_string()),
        ("compress-type", "zst".into()),
        ("start-fast", "y".into()),
        ("log-path", dir.join("log").to_string_lossy().into_owned()),
        ("lock-path", dir.join("lock").to_string_lossy().into_owned()),
        ("log-level-console", "warn".into()),
        ("log-level-file", "info".into()),
    ];
    for (key, value) in global {
        let _ = writeln!(text, "{key}={value}");
    }
    if inputs.primary.is_some() {
        let _ = writeln!(text, "backup-standby=y");
    }
    let _ = writeln!(text, "\n[{}]", settings.stanza);
    let servers = std::iter::once(&inputs.own).chain(inputs.primary.as_ref());
    for (index, server) in servers.enumerate() {
        let n = index + 1;
        let _ = writeln!(text, "pg{n}-path={}", server.data_dir);
        let _ = writeln!(text, "pg{n}-port={}", server.port);
        let _ = writeln!(text, "pg{n}-socket-path={}", server.socket_dir);
        let _ = writeln!(text, "pg{n}-user={}", inputs.superuser);
        let _ = writeln!(text, "pg{n}-database=postgres");
    }
    text
}

/// Quotes a word for `/bin/sh`.
pub fn shell_quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-=".contains(c))
    {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(dir: &str, port: u16) -> Server {
        Server {
            data_dir: dir.into(),
            port,
            socket_dir: format!("{dir}/run"),
        }
    }

    #[test]
    fn a_standby_on_the_primarys_host_lists_both_servers() {
        let settings = BackupSettings {
            stanza: "votes".into(),
            repo_path: "/srv/repo".into(),
            ..Default::default()
        };
        let text = render(&ConfInputs {
            settings: &settings,
            state_dir: Path::new("/var/lib/jai"),
            superuser: "postgres",
            own: server("/d/pg2", 5433),
            primary: Some(server("/d/pg1", 5432)),
        });
        assert!(text.contains("repo1-path=/srv/repo\n"), "{text}");
        assert!(text.contains("backup-standby=y\n"));
        assert!(text.contains("[votes]\npg1-path=/d/pg2\npg1-port=5433\n"));
        assert!(text.contains("pg2-path=/d/pg1\npg2-port=5432\n"));
        assert!(text.contains("log-path=/var/lib/jai/pgbackrest/log\n"));
    }

    #[test]
    fn a_primary_lists_only_itself() {
        let text = render(&ConfInputs {
            settings: &BackupSettings::default(),
            state_dir: Path::new("/s"),
            superuser: "postgres",
            own: server("/d/pg1", 5432),
            primary: None,
        });
        assert!(!text.contains("backup-standby"));
        assert!(!text.contains("pg2-"));
    }

    #[test]
    fn commands_quote_what_the_shell_would_split() {
        let invocation = Invocation {
            program: "/usr/bin/pgbackrest".into(),
            config: "/var/lib/my jai/pgbackrest.conf".into(),
            stanza: "main".into(),
        };
        assert_eq!(
            invocation.archive_command(),
            "/usr/bin/pgbackrest --config='/var/lib/my jai/pgbackrest.conf' --stanza=main archive-push \"%p\""
        );
        assert!(invocation
            .restore_command()
            .ends_with("archive-get %f \"%p\""));
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
    }
}
