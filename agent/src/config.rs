//! The agent's own YAML configuration file: who this node is and where things live.
//!
//! Cluster-wide settings (timings, PostgreSQL parameters) live in etcd's `config`
//! key; the `bootstrap.dcs` section here only seeds that key when this member
//! bootstraps a new cluster. Every setting is validated before the agent acts:
//! an unknown key or a bad value stops it with the file, the key and the reason.
//!
//! Every section's type lives here, the `haproxy:` section's
//! ([`HaproxyConfig`]) too: the modules that act on a section import it from
//! here, and this module imports none of them.

use crate::bytes::ByteCount;
use jai_proto::{DynamicConfig, Tags};
use serde::Deserialize;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This member's name: unique in the cluster, also its replication slot name.
    pub name: String,
    /// The cluster's name; all its etcd keys live under `/jai/<cluster>/`.
    pub cluster: String,
    /// Where the agent keeps its runtime files (passfile, PostgreSQL log, socket).
    pub state_dir: PathBuf,
    /// How to reach etcd.
    pub etcd: EtcdConfig,
    /// The health and status HTTP API.
    pub api: ApiConfig,
    /// The gRPC control API `jaictl` drives (optional: without it the
    /// member can only be operated through etcd by the other agents).
    #[serde(default)]
    pub grpc: Option<GrpcConfig>,
    /// The PostgreSQL this agent supervises.
    pub postgresql: PostgresConfig,
    /// Election and routing tags of this member.
    #[serde(default)]
    pub tags: Tags,
    /// Used only by the member that bootstraps a new cluster.
    #[serde(default)]
    pub bootstrap: BootstrapConfig,
    /// Load balancers to tell about role changes at once (optional).
    #[serde(default)]
    pub haproxy: Option<HaproxyConfig>,
    /// How the log is written (stderr; `format: text|json`).
    #[serde(default)]
    pub log: jai_proto::logging::LogConfig,
}

/// How to reach etcd.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// Client URLs of the etcd members, e.g. `http://10.0.0.1:2379`.
    pub endpoints: Vec<String>,
}

/// The HTTP API HAProxy and operators use.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Address to listen on, e.g. `0.0.0.0:8008`.
    pub listen: SocketAddr,
    /// URL other members and tools use to reach it; defaults to `http://<listen>`.
    #[serde(default)]
    pub connect_url: Option<String>,
}

/// The gRPC control API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcConfig {
    /// Address to listen on, e.g. `0.0.0.0:8010`.
    pub listen: SocketAddr,
    /// URL `jaictl` uses to reach it; defaults to `http://<listen>`.
    #[serde(default)]
    pub connect_url: Option<String>,
    /// File whose first line is the control token every mutating call must
    /// present. A file, never inline, so it stays out of the config and ps.
    pub token_file: PathBuf,
}

/// Shortest control token accepted: guessing must be hopeless.
pub const MIN_TOKEN_LENGTH: usize = 16;

impl GrpcConfig {
    /// The control token, read from `token_file`.
    pub fn token(&self) -> anyhow::Result<String> {
        use anyhow::Context;
        let text = std::fs::read_to_string(&self.token_file)
            .with_context(|| format!("cannot read {}", self.token_file.display()))?;
        let token = text.lines().next().unwrap_or_default().trim().to_owned();
        anyhow::ensure!(
            token.len() >= MIN_TOKEN_LENGTH,
            "{}: the token must be at least {MIN_TOKEN_LENGTH} characters",
            self.token_file.display()
        );
        Ok(token)
    }
}

/// The PostgreSQL this agent supervises.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// Directory with `initdb`, `postgres`, `pg_basebackup`, `pg_controldata`.
    #[serde(default = "default_bin_dir")]
    pub bin_dir: PathBuf,
    /// The data directory; created by the agent when missing.
    pub data_dir: PathBuf,
    /// Address PostgreSQL listens on for TCP, e.g. `0.0.0.0:5432`.
    pub listen: SocketAddr,
    /// `host:port` other members and HAProxy use to reach it; defaults to `listen`.
    #[serde(default)]
    pub connect_address: Option<String>,
    /// Unprivileged OS user PostgreSQL runs as when the agent runs as root.
    #[serde(default)]
    pub run_as: Option<String>,
    /// The database superuser the agent connects as.
    pub superuser: Credentials,
    /// The role replicas stream and clone with.
    pub replication: Credentials,
    /// Extra `pg_hba.conf` lines, placed before the agent's defaults.
    #[serde(default)]
    pub pg_hba: Vec<String>,
    /// When `pg_rewind` of a former primary fails, wipe its data directory and
    /// clone from the leader instead of staying down for an operator.
    #[serde(default)]
    pub reclone_on_rewind_failure: bool,
    /// How long PostgreSQL may take to start or stop before the agent gives up on it.
    #[serde(default = "default_pg_timeout", with = "humantime_serde")]
    pub start_timeout: std::time::Duration,
    /// The `pgbackrest` program, used when the cluster config has a `backup`
    /// section (WAL archive, backups, clones from the repository).
    #[serde(default = "default_pgbackrest")]
    pub pgbackrest: PathBuf,
}

fn default_pgbackrest() -> PathBuf {
    PathBuf::from("/usr/bin/pgbackrest")
}

/// A role name and its password, given inline or, better, in a file.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    /// Role name.
    pub username: String,
    /// Password inline. Prefer `password_file`.
    #[serde(default)]
    pub password: Option<String>,
    /// File whose first line is the password.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

/// A secret file that other users can read (or write) is refused: the
/// secret would not be one, and a writable one lets others choose it.
fn check_secret_mode(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|error| format!("{}: {error}", path.display()))?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{} has mode {mode:04o}: other users can read it; run `chmod 600 {}`",
            path.display(),
            path.display()
        ));
    }
    Ok(())
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print a password, even in debug output.
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password_file", &self.password_file)
            .finish_non_exhaustive()
    }
}

/// Settings used only when this member bootstraps a new cluster.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootstrapConfig {
    /// Seed for the cluster-wide `config` key.
    #[serde(default)]
    pub dcs: DynamicConfig,
}

/// Where HAProxy's admin-level runtime API listens and which backends are ours.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaproxyConfig {
    /// Runtime API sockets: a Unix socket path, or `HOST:PORT`.
    pub sockets: Vec<String>,
    /// The backend (or `listen` section) routing writes to the primary.
    #[serde(default = "default_write_backend")]
    pub write_backend: String,
    /// The backend balancing reads over the replicas; `null`: none.
    #[serde(default = "default_read_backend")]
    pub read_backend: Option<String>,
    /// Replicas further behind than this leave the read backend.
    #[serde(default = "default_max_read_lag")]
    pub max_read_lag: ByteCount,
    /// The servers' check interval in `haproxy.cfg`, given to servers added at runtime.
    #[serde(default = "default_check_interval", with = "humantime_serde")]
    pub check_interval: std::time::Duration,
}

fn default_write_backend() -> String {
    "jai_write".into()
}

fn default_read_backend() -> Option<String> {
    Some("jai_read".into())
}

fn default_max_read_lag() -> ByteCount {
    ByteCount::Bytes(1 << 20)
}

fn default_check_interval() -> std::time::Duration {
    std::time::Duration::from_secs(2)
}

impl HaproxyConfig {
    /// Checks what serde cannot: returns the key (under `haproxy.`) and why.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let fail = |key: &str, reason: String| Err((format!("haproxy.{key}"), reason));
        if self.sockets.is_empty() {
            return fail("sockets", "needs at least one socket".into());
        }
        for (index, socket) in self.sockets.iter().enumerate() {
            let tcp = socket
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !socket.starts_with('/') && !tcp {
                return fail(
                    &format!("sockets[{index}]"),
                    format!("{socket:?} is neither an absolute Unix socket path nor HOST:PORT"),
                );
            }
        }
        if self.write_backend.is_empty() {
            return fail("write_backend", "must not be empty".into());
        }
        if let Some(read) = &self.read_backend {
            if read == &self.write_backend {
                return fail("read_backend", "must differ from write_backend".into());
            }
        }
        if let Err(reason) = self.max_read_lag.bytes() {
            return fail("max_read_lag", reason);
        }
        if self.check_interval.is_zero() {
            return fail("check_interval", "must be more than 0".into());
        }
        Ok(())
    }
}

fn default_bin_dir() -> PathBuf {
    PathBuf::from("/usr/lib/postgresql/15/bin")
}

fn default_pg_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(60)
}

/// Why the configuration cannot be used. Always names the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file could not be read.
    #[error("{file}: cannot read: {source}")]
    Read {
        /// The configuration file.
        file: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The YAML does not match the schema (unknown key, wrong type, bad duration…).
    #[error("{file}: {message}")]
    Parse {
        /// The configuration file.
        file: PathBuf,
        /// The parser's message, which names the key and the position.
        message: String,
    },
    /// A value parsed but breaks a rule.
    #[error("{file}: {key}: {reason}")]
    Invalid {
        /// The configuration file.
        file: PathBuf,
        /// The offending key, as a dotted path.
        key: String,
        /// What is wrong and what would be accepted.
        reason: String,
    },
}

impl AgentConfig {
    /// Reads, parses and validates `file`.
    pub fn load(file: &Path) -> Result<Self, ConfigFileError> {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigFileError::Read {
            file: file.to_owned(),
            source,
        })?;
        Self::parse(file, &text)
    }

    /// Parses and validates `text`, reporting errors against `file`.
    pub fn parse(file: &Path, text: &str) -> Result<Self, ConfigFileError> {
        let config: AgentConfig =
            serde_saphyr::from_str(text).map_err(|error| ConfigFileError::Parse {
                file: file.to_owned(),
                message: error.to_string(),
            })?;
        config
            .validate()
            .map_err(|(key, reason)| ConfigFileError::Invalid {
                file: file.to_owned(),
                key,
                reason,
            })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), (String, String)> {
        let fail = |key: &str, reason: &str| Err((key.to_owned(), reason.to_owned()));
        if !is_valid_name(&self.name) {
            return fail(
                "name",
                "must be 1-40 characters of a-z, 0-9 or -, starting with a letter",
            );
        }
        if !is_valid_name(&self.cluster) {
            return fail(
                "cluster",
                "must be 1-40 characters of a-z, 0-9 or -, starting with a letter",
            );
        }
        if self.etcd.endpoints.is_empty() {
            return fail("etcd.endpoints", "needs at least one URL");
        }
        for (index, url) in self.etcd.endpoints.iter().enumerate() {
            if url.starts_with("https://") {
                return fail(
                    &format!("etcd.endpoints[{index}]"),
                    "TLS to etcd is not supported yet: use http:// on a private network",
                );
            }
            if !url.starts_with("http://") {
                return fail(
                    &format!("etcd.endpoints[{index}]"),
                    &format!("{url:?} is not an http:// URL"),
                );
            }
        }
        if self.api.listen.ip().is_unspecified() && self.api.connect_url.is_none() {
            return fail(
                "api.connect_url",
                "required when api.listen is a wildcard address: other members need a routable URL",
            );
        }
        if let Some(grpc) = &self.grpc {
            if grpc.listen.ip().is_unspecified() && grpc.connect_url.is_none() {
                return fail(
                    "grpc.connect_url",
                    "required when grpc.listen is a wildcard address: jaictl needs a routable URL",
                );
            }
            if grpc.listen == self.api.listen {
                return fail("grpc.listen", "must differ from api.listen");
            }
        }
        if self.postgresql.listen.ip().is_unspecified() && self.postgresql.connect_address.is_none()
        {
            return fail(
                "postgresql.connect_address",
                "required when postgresql.listen is a wildcard address: replicas need a routable host:port",
            );
        }
        if !self.postgresql.data_dir.is_absolute() {
            return fail("postgresql.data_dir", "must be an absolute path");
        }
        if !self.state_dir.is_absolute() {
            return fail("state_dir", "must be an absolute path");
        }
        for (key, credentials) in [
            ("postgresql.superuser", &self.postgresql.superuser),
            ("postgresql.replication", &self.postgresql.replication),
        ] {
            if !is_valid_role(&credentials.username) {
                return fail(
                    &format!("{key}.username"),
                    "must be 1-63 characters of a-z, 0-9 or _, starting with a letter",
                );
            }
            match (&credentials.password, &credentials.password_file) {
                (Some(_), Some(_)) => {
                    return fail(key, "set either password or password_file, not both")
                }
                (None, None) => return fail(key, "needs password or password_file"),
                _ => {}
            }
        }
        if self.postgresql.superuser.username == self.postgresql.replication.username {
            return fail(
                "postgresql.replication.username",
                "must differ from postgresql.superuser.username",
            );
        }
        if let Some(haproxy) = &self.haproxy {
            haproxy.validate()?;
        }
        self.bootstrap
            .dcs
            .validate()
            .map_err(|error| (format!("bootstrap.dcs.{}", error.field), error.reason))
    }

    /// Checks what only this machine can tell: the PostgreSQL user exists (and
    /// is set when running as root) and the password files are readable. Run by
    /// `--check` and at start-up, so both fail the same way.
    pub fn check_environment(&self, file: &Path) -> Result<(), ConfigFileError> {
        let invalid = |key: &str, reason: String| ConfigFileError::Invalid {
            file: file.to_owned(),
            key: key.to_owned(),
            reason,
        };
        match &self.postgresql.run_as {
            None if nix::unistd::Uid::effective().is_root() => {
                return Err(invalid(
                    "postgresql.run_as",
                    "required when the agent runs as root (PostgreSQL refuses to run as root)"
                        .into(),
                ))
            }
            Some(user) => match nix::unistd::User::from_name(user) {
                Ok(Some(_)) => {}
                _ => {
                    return Err(invalid(
                        "postgresql.run_as",
                        format!("no OS user {user:?} on this machine"),
                    ))
                }
            },
            None => {}
        }
        for (key, credentials) in [
            ("postgresql.superuser", &self.postgresql.superuser),
            ("postgresql.replication", &self.postgresql.replication),
        ] {
            credentials
                .password()
                .map_err(|error| invalid(key, format!("{error:#}")))?;
            if let Some(path) = &credentials.password_file {
                check_secret_mode(path)
                    .map_err(|reason| invalid(&format!("{key}.password_file"), reason))?;
            }
        }
        if let Some(grpc) = &self.grpc {
            grpc.token()
                .map_err(|error| invalid("grpc.token_file", format!("{error:#}")))?;
            check_secret_mode(&grpc.token_file)
                .map_err(|reason| invalid("grpc.token_file", reason))?;
        }
        Ok(())
    }

    /// The URL of this member's API as other members see it.
    pub fn api_url(&self) -> String {
        self.api
            .connect_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.api.listen))
    }

    /// The URL of this member's gRPC control API, when it serves one.
    pub fn grpc_url(&self) -> Option<String> {
        self.grpc.as_ref().map(|grpc| {
            grpc.connect_url
                .clone()
                .unwrap_or_else(|| format!("http://{}", grpc.listen))
        })
    }

    /// Where this member's PostgreSQL keeps its files (the socket directory
    /// is the agent's: `<state_dir>/run`).
    pub fn pg_paths(&self) -> jai_proto::PgPaths {
        jai_proto::PgPaths {
            data_dir: self.postgresql.data_dir.to_string_lossy().into_owned(),
            socket_dir: self.socket_dir().to_string_lossy().into_owned(),
        }
    }

    /// The directory of PostgreSQL's Unix socket.
    pub fn socket_dir(&self) -> PathBuf {
        self.state_dir.join("run")
    }

    /// `host:port` of this member's PostgreSQL as other members see it.
    pub fn pg_address(&self) -> String {
        self.postgresql
            .connect_address
            .clone()
            .unwrap_or_else(|| self.postgresql.listen.to_string())
    }
}

impl Credentials {
    /// The password, read from the file when one is configured.
    pub fn password(&self) -> anyhow::Result<String> {
        use anyhow::Context;
        match (&self.password, &self.password_file) {
            (Some(password), _) => Ok(password.clone()),
            (None, Some(file)) => {
                let text = std::fs::read_to_string(file)
                    .with_context(|| format!("reading password file {}", file.display()))?;
                let password = text.lines().next().unwrap_or("").to_owned();
                anyhow::ensure!(!password.is_empty(), "{} is empty", file.display());
                Ok(password)
            }
            (None, None) => anyhow::bail!("no password configured for {}", self.username),
        }
    }
}

fn is_valid_name(name: &str) -> bool {
    (1..=40).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        // No `_`: the slot name maps `-` to `_`, and must stay unique.
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

fn is_valid_role(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name: pg1
cluster: votes
state_dir: /var/lib/jai/pg1
etcd:
  endpoints: [http://127.0.0.1:2379]
api:
  listen: 127.0.0.1:8008
postgresql:
  data_dir: /var/lib/jai/pg1/data
  listen: 127.0.0.1:5432
  run_as: postgres
  superuser: {username: postgres, password: secret}
  replication: {username: replicator, password_file: /etc/jai/repl}
bootstrap:
  dcs:
    ttl: 5s
    loop_wait: 1s
    retry_timeout: 2s
"#;

    fn parse(text: &str) -> Result<AgentConfig, ConfigFileError> {
        AgentConfig::parse(Path::new("agent.yaml"), text)
    }

    #[test]
    fn a_good_file_parses() {
        let config = parse(GOOD).unwrap();
        assert_eq!(config.name, "pg1");
        assert_eq!(config.api_url(), "http://127.0.0.1:8008");
        assert_eq!(config.pg_address(), "127.0.0.1:5432");
        assert_eq!(config.bootstrap.dcs.ttl, std::time::Duration::from_secs(5));
    }

    #[test]
    fn debug_output_hides_passwords() {
        let config = parse(GOOD).unwrap();
        assert!(!format!("{config:?}").contains("secret"));
    }

    #[test]
    fn unknown_keys_are_named() {
        let error = parse(&GOOD.replace("run_as:", "run_ass:")).unwrap_err();
        let text = error.to_string();
        assert!(text.starts_with("agent.yaml: "), "{text}");
        assert!(text.contains("run_ass"), "{text}");
    }

    #[test]
    fn bad_durations_are_named() {
        let error = parse(&GOOD.replace("loop_wait: 1s", "loop_wait: 1 parsec")).unwrap_err();
        let text = error.to_string();
        assert!(
            text.contains("loop_wait") || text.contains("parsec"),
            "{text}"
        );
    }

    #[test]
    fn ttl_must_cover_loop_and_retries() {
        let error = parse(&GOOD.replace("ttl: 5s", "ttl: 4s")).unwrap_err();
        let text = error.to_string();
        assert!(text.contains("bootstrap.dcs.ttl"), "{text}");
        assert!(text.contains("loop_wait + 2 * retry_timeout"), "{text}");
    }

    #[test]
    fn passwords_need_exactly_one_source() {
        let text = GOOD.replace(
            "{username: postgres, password: secret}",
            "{username: postgres}",
        );
        let error = parse(&text).unwrap_err().to_string();
        assert!(error.contains("postgresql.superuser"), "{error}");
    }

    #[test]
    fn the_haproxy_section_has_defaults_and_is_validated() {
        let config: HaproxyConfig =
            serde_saphyr::from_str("sockets: [/run/haproxy/admin.sock]").unwrap();
        assert_eq!(config.write_backend, "jai_write");
        assert_eq!(config.read_backend.as_deref(), Some("jai_read"));
        assert_eq!(config.max_read_lag.bytes(), Ok(1 << 20));
        assert!(config.validate().is_ok());
        let text: HaproxyConfig =
            serde_saphyr::from_str("sockets: [127.0.0.1:9999]\nmax_read_lag: 16kB").unwrap();
        assert_eq!(text.max_read_lag.bytes(), Ok(16 << 10));
        let bad: HaproxyConfig = serde_saphyr::from_str("sockets: [admin.sock]").unwrap();
        assert_eq!(bad.validate().unwrap_err().0, "haproxy.sockets[0]");
    }

    #[test]
    fn missing_file_names_the_file() {
        let error = AgentConfig::load(Path::new("/nonexistent/jai.yaml")).unwrap_err();
        assert!(error
            .to_string()
            .starts_with("/nonexistent/jai.yaml: cannot read"));
    }
}
