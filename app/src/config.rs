//! The YAML configuration file, validated at the boundary.
//!
//! Unknown keys are refused and every error names the file and the key
//! (`FILE: KEY: reason`), so a typo never silently falls back to a default.
//! Secrets (cookie signing key, admin password hash, database password) are
//! never written in the file itself: each is read from a file named in the
//! configuration or from an environment variable, so they stay out of command
//! lines, process listings and logs.

use crate::forwarded::TrustedProxies;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Environment variable that may hold the database password.
pub const ENV_DB_PASSWORD: &str = "JAI_APP_DB_PASSWORD";
/// Environment variable that may hold the cookie signing key.
pub const ENV_COOKIE_KEY: &str = "JAI_APP_COOKIE_KEY";
/// Environment variable that may hold the admin password hash.
pub const ENV_ADMIN_HASH: &str = "JAI_APP_ADMIN_PASSWORD_HASH";
/// Environment variable that may hold the bearer token of `/metrics`.
pub const ENV_METRICS_TOKEN: &str = "JAI_APP_METRICS_TOKEN";

/// The shortest accepted `/metrics` token, in bytes.
const MIN_METRICS_TOKEN: usize = 16;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    /// Public listener (`HOST:PORT`).
    pub listen: SocketAddr,
    /// The admin listener and its credential.
    pub admin: AdminConfig,
    /// Where the data lives.
    pub database: DatabaseConfig,
    /// Cookie signing.
    pub cookies: CookieConfig,
    /// Caching of rendered data.
    #[serde(default)]
    pub cache: CacheConfig,
    /// View counting.
    #[serde(default)]
    pub views: ViewsConfig,
    /// Abuse limits.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Timeouts and the connection cap of each listener.
    #[serde(default)]
    pub connections: ConnectionsConfig,
    /// Worker threads of the async runtime; absent: one per core. Set it
    /// below the core count when several instances (or PostgreSQL) share a
    /// machine: fewer threads mean fewer cross-thread wake-ups per request.
    #[serde(default)]
    pub workers: Option<usize>,
    /// How the log is written (stderr; `format: text|json`).
    #[serde(default)]
    pub log: jai_proto::logging::LogConfig,
}

/// The admin listener (its own port, meant for the admin node only).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Admin listener (`HOST:PORT`).
    pub listen: SocketAddr,
    /// The admin user name.
    #[serde(default = "default_admin_user")]
    pub username: String,
    /// File holding the argon2 hash made by `jai-app hash-password`
    /// (else the environment variable `JAI_APP_ADMIN_PASSWORD_HASH`).
    pub password_hash_file: Option<PathBuf>,
    /// How long an admin session lasts.
    #[serde(default = "default_session_ttl", with = "humantime_serde")]
    pub session_ttl: Duration,
    /// File holding the bearer token a scraper must send for `/metrics`
    /// (else the environment variable `JAI_APP_METRICS_TOKEN`). Absent:
    /// `/metrics` answers whoever reaches the admin port.
    pub metrics_token_file: Option<PathBuf>,
}

/// Database access through HAProxy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// libpq-style connection string of the write port, e.g.
    /// `host=10.0.0.5 port=5000 user=jai dbname=jai`. Several hosts may be
    /// listed (`host=a,b port=5000,5000`); no password here.
    pub write: String,
    /// The same for the read port (replicas); reads use `write` when absent.
    pub read: Option<String>,
    /// File holding the database password (else `JAI_APP_DB_PASSWORD`, else none).
    pub password_file: Option<PathBuf>,
    /// Connections per pool (reads, admin writes, view flushes).
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// Write connections shared by every vote in flight, which pipeline on
    /// them (see `pipelined`): a few serve more votes than a pool of many.
    #[serde(default = "default_vote_connections")]
    pub vote_connections: usize,
    /// How long a vote is retried through a failover before the voter is told to try again.
    #[serde(default = "default_retry_timeout", with = "humantime_serde")]
    pub retry_timeout: Duration,
    /// Timeout of one connection attempt.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
}

/// Signed cookies.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CookieConfig {
    /// File holding the signing key, at least 32 bytes (else `JAI_APP_COOKIE_KEY`).
    /// Every app node must use the same key.
    pub signing_key_file: Option<PathBuf>,
    /// Mark cookies `Secure` (behind TLS termination, e.g. Cloudflare).
    #[serde(default)]
    pub secure: bool,
}

/// Short-lived caches.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// How long poll data and results are served from memory (and by Cloudflare).
    #[serde(default = "default_results_ttl", with = "humantime_serde")]
    pub results_ttl: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            results_ttl: default_results_ttl(),
        }
    }
}

/// View batching.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ViewsConfig {
    /// How often counted views are written; a crash loses at most this much.
    #[serde(default = "default_flush_interval", with = "humantime_serde")]
    pub flush_interval: Duration,
}

impl Default for ViewsConfig {
    fn default() -> Self {
        Self {
            flush_interval: default_flush_interval(),
        }
    }
}

/// Abuse limits (per app node: see docs/app.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest accepted request body in bytes.
    #[serde(default = "default_body_bytes")]
    pub body_bytes: usize,
    /// Vote submissions per voter per minute (burst of the same size).
    #[serde(default = "default_voter_rate")]
    pub votes_per_voter_per_minute: u32,
    /// Vote submissions per client address per minute (burst of the same size).
    #[serde(default = "default_ip_rate")]
    pub votes_per_ip_per_minute: u32,
    /// The proxies (addresses or CIDR blocks) whose `X-Forwarded-For` names
    /// the client on the public listener (see `forwarded`). Empty: the
    /// client is always the TCP peer.
    #[serde(default)]
    pub trusted_proxies: TrustedProxies,
    /// Replaced by `trusted_proxies`: `false` is accepted and means nothing,
    /// `true` (believe the header from anyone) is refused with a hint.
    #[serde(default)]
    pub trust_forwarded_for: Option<bool>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            body_bytes: default_body_bytes(),
            votes_per_voter_per_minute: default_voter_rate(),
            votes_per_ip_per_minute: default_ip_rate(),
            trusted_proxies: TrustedProxies::default(),
            trust_forwarded_for: None,
        }
    }
}

/// How long each listener lets a client hold a connection, and how many it
/// holds at once (the public and the admin listener each; see `listener`).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ConnectionsConfig {
    /// From a request's first byte to the end of its headers.
    #[serde(default = "default_header_read_timeout", with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// From the end of the headers to the end of the body.
    #[serde(default = "default_body_read_timeout", with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// A connection without a request under way (new, or kept alive after
    /// one) is closed after this long; also bounds writing an answer to a
    /// client that does not read it.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Connections open at once per listener. At the cap a new connection
    /// closes the one that has waited longest on its client; if every
    /// connection has a request in a handler, it waits in the kernel's queue.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
}

impl Default for ConnectionsConfig {
    fn default() -> Self {
        Self {
            header_read_timeout: default_header_read_timeout(),
            body_read_timeout: default_body_read_timeout(),
            idle_timeout: default_idle_timeout(),
            max_connections: default_max_connections(),
        }
    }
}

fn default_header_read_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_body_read_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_max_connections() -> usize {
    1000
}

fn default_admin_user() -> String {
    "admin".into()
}
fn default_session_ttl() -> Duration {
    Duration::from_secs(12 * 3600)
}
fn default_pool_size() -> usize {
    16
}
fn default_vote_connections() -> usize {
    4
}
fn default_retry_timeout() -> Duration {
    Duration::from_secs(15)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_results_ttl() -> Duration {
    Duration::from_secs(2)
}
fn default_flush_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_body_bytes() -> usize {
    16 * 1024
}
fn default_voter_rate() -> u32 {
    30
}
fn default_ip_rate() -> u32 {
    600
}

/// A configuration file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("{file}: cannot read: {source}")]
    Read {
        /// The configuration file.
        file: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not YAML of the expected shape (unknown key, wrong type …).
    #[error("{file}: {message}")]
    Parse {
        /// The configuration file.
        file: PathBuf,
        /// The parser's message, which names the key and the position.
        message: String,
    },
    /// A value breaks a rule.
    #[error("{file}: {key}: {reason}")]
    Invalid {
        /// The configuration file.
        file: PathBuf,
        /// The offending key, dotted.
        key: String,
        /// What is wrong and what would be accepted.
        reason: String,
    },
}

/// The secrets, read once at start and never logged.
#[derive(Clone)]
pub struct Secrets {
    /// HMAC key for cookies and CSRF tokens.
    pub cookie_key: Vec<u8>,
    /// PHC string of the admin password (argon2).
    pub admin_hash: String,
    /// Database password, if any.
    pub db_password: Option<String>,
    /// Bearer token `/metrics` requires, if any.
    pub metrics_token: Option<String>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secrets(redacted)")
    }
}

impl AppConfig {
    /// Reads, parses and validates `file`.
    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            file: file.to_owned(),
            source,
        })?;
        Self::parse(file, &text)
    }

    /// Parses and validates `text`, reporting errors against `file`.
    pub fn parse(file: &Path, text: &str) -> Result<Self, ConfigError> {
        let config: AppConfig = serde_saphyr::from_str(text)
            .map_err(|error| parse_error(file, text, &error.to_string()))?;
        config
            .validate()
            .map_err(|(key, reason)| ConfigError::Invalid {
                file: file.to_owned(),
                key: key.to_owned(),
                reason,
            })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), (&'static str, String)> {
        let positive = |key, value: Duration| {
            if value.is_zero() {
                Err((key, "must be greater than zero".to_owned()))
            } else {
                Ok(())
            }
        };
        if self
            .workers
            .is_some_and(|workers| !(1..=256).contains(&workers))
        {
            return Err(("workers", "must be 1-256".into()));
        }
        if self.listen == self.admin.listen {
            return Err((
                "admin.listen",
                "must differ from listen: the admin interface has its own port".into(),
            ));
        }
        if self.admin.username.is_empty() || self.admin.username.len() > 64 {
            return Err(("admin.username", "must be 1-64 characters".into()));
        }
        positive("admin.session_ttl", self.admin.session_ttl)?;
        check_conninfo("database.write", &self.database.write)?;
        if let Some(read) = &self.database.read {
            check_conninfo("database.read", read)?;
        }
        if !(1..=1000).contains(&self.database.pool_size) {
            return Err(("database.pool_size", "must be 1-1000".into()));
        }
        if !(1..=1000).contains(&self.database.vote_connections) {
            return Err(("database.vote_connections", "must be 1-1000".into()));
        }
        positive("database.retry_timeout", self.database.retry_timeout)?;
        positive("database.connect_timeout", self.database.connect_timeout)?;
        positive("cache.results_ttl", self.cache.results_ttl)?;
        positive("views.flush_interval", self.views.flush_interval)?;
        if self.limits.body_bytes < 1024 {
            return Err(("limits.body_bytes", "must be at least 1024".into()));
        }
        if self.limits.votes_per_voter_per_minute == 0 {
            return Err((
                "limits.votes_per_voter_per_minute",
                "must be at least 1".into(),
            ));
        }
        if self.limits.votes_per_ip_per_minute == 0 {
            return Err((
                "limits.votes_per_ip_per_minute",
                "must be at least 1".into(),
            ));
        }
        if self.limits.trust_forwarded_for == Some(true) {
            return Err((
                "limits.trust_forwarded_for",
                "replaced by limits.trusted_proxies: list the addresses of your proxies \
                 (e.g. [127.0.0.1] for HAProxy on this machine); believing X-Forwarded-For \
                 from every peer lets any client pick its own address"
                    .into(),
            ));
        }
        let connections = &self.connections;
        for (key, value) in [
            (
                "connections.header_read_timeout",
                connections.header_read_timeout,
            ),
            (
                "connections.body_read_timeout",
                connections.body_read_timeout,
            ),
            ("connections.idle_timeout", connections.idle_timeout),
        ] {
            if value < Duration::from_millis(100) || value > Duration::from_secs(3600) {
                return Err((key, "must be 100ms-1h".into()));
            }
        }
        if !(1..=100_000).contains(&connections.max_connections) {
            return Err(("connections.max_connections", "must be 1-100000".into()));
        }
        Ok(())
    }

    /// Reads the secrets from their files or environment variables.
    pub fn load_secrets(&self, file: &Path) -> Result<Secrets, ConfigError> {
        let invalid = |key: &str, reason: String| ConfigError::Invalid {
            file: file.to_owned(),
            key: key.to_owned(),
            reason,
        };
        let cookie_key = read_secret(self.cookies.signing_key_file.as_deref(), ENV_COOKIE_KEY)
            .map_err(|reason| invalid("cookies.signing_key_file", reason))?
            .ok_or_else(|| {
                invalid(
                    "cookies.signing_key_file",
                    format!("required (or set {ENV_COOKIE_KEY})"),
                )
            })?;
        if cookie_key.len() < 32 {
            return Err(invalid(
                "cookies.signing_key_file",
                "the key must be at least 32 bytes".into(),
            ));
        }
        let admin_hash = read_secret(self.admin.password_hash_file.as_deref(), ENV_ADMIN_HASH)
            .map_err(|reason| invalid("admin.password_hash_file", reason))?
            .ok_or_else(|| {
                invalid(
                    "admin.password_hash_file",
                    format!(
                        "required (or set {ENV_ADMIN_HASH}); make one with `jai-app hash-password`"
                    ),
                )
            })?;
        crate::auth::check_hash_format(&admin_hash).map_err(|reason| {
            invalid(
                "admin.password_hash_file",
                format!("{reason}; make one with `jai-app hash-password`"),
            )
        })?;
        let db_password = read_secret(self.database.password_file.as_deref(), ENV_DB_PASSWORD)
            .map_err(|reason| invalid("database.password_file", reason))?;
        let metrics_token =
            read_secret(self.admin.metrics_token_file.as_deref(), ENV_METRICS_TOKEN)
                .map_err(|reason| invalid("admin.metrics_token_file", reason))?;
        if metrics_token
            .as_ref()
            .is_some_and(|token| token.len() < MIN_METRICS_TOKEN)
        {
            return Err(invalid(
                "admin.metrics_token_file",
                format!("the token must be at least {MIN_METRICS_TOKEN} bytes"),
            ));
        }
        Ok(Secrets {
            cookie_key: cookie_key.into_bytes(),
            admin_hash,
            metrics_token,
            db_password,
        })
    }
}

fn parse_error(file: &Path, text: &str, message: &str) -> ConfigError {
    match locate(text, message) {
        Some((key, reason)) => ConfigError::Invalid {
            file: file.to_owned(),
            key,
            reason,
        },
        None => ConfigError::Parse {
            file: file.to_owned(),
            message: message.lines().next().unwrap_or_default().to_owned(),
        },
    }
}

/// Turns the parser's "line L column C: reason" into the dotted key at
/// that line and "reason (line L)", so errors read `FILE: KEY: reason`.
fn locate(text: &str, message: &str) -> Option<(String, String)> {
    let first = message.lines().next()?;
    let rest = first.split_once("line ")?.1;
    let (line, rest) = rest.split_once(" column ")?;
    let line: usize = line.parse().ok()?;
    let reason = rest.split_once(": ")?.1;
    let key = key_path_at(text, line)?;
    Some((key, format!("{reason} (line {line})")))
}

/// The dotted path of the block-style key on 1-based `line` of `text`.
fn key_path_at(text: &str, line: usize) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let target = lines.get(line.checked_sub(1)?)?;
    let indent_of = |line: &str| line.len() - line.trim_start().len();
    let key_of = |line: &str| {
        let trimmed = line.trim_start().trim_start_matches("- ");
        trimmed
            .split_once(':')
            .map(|(key, _)| key.trim().to_owned())
            .filter(|key| !key.is_empty() && !key.starts_with('#'))
    };
    let mut path = vec![key_of(target)?];
    let mut indent = indent_of(target);
    for above in lines[..line - 1].iter().rev() {
        if above.trim().is_empty() || above.trim_start().starts_with('#') {
            continue;
        }
        if indent_of(above) < indent {
            indent = indent_of(above);
            path.push(key_of(above)?);
        }
    }
    path.reverse();
    Some(path.join("."))
}

/// A secret from `file` (trailing newline removed), else from `env`.
fn read_secret(file: Option<&Path>, env: &str) -> Result<Option<String>, String> {
    if let Some(file) = file {
        let text = std::fs::read_to_string(file)
            .map_err(|error| format!("cannot read {}: {error}", file.display()))?;
        let text = text.trim_end_matches(['\n', '\r']).to_owned();
        if text.is_empty() {
            return Err(format!("{} is empty", file.display()));
        }
        return Ok(Some(text));
    }
    Ok(std::env::var(env).ok().filter(|value| !value.is_empty()))
}

/// A connection string must parse and must not carry a password.
fn check_conninfo(key: &'static str, text: &str) -> Result<(), (&'static str, String)> {
    let config: tokio_postgres::Config = text
        .parse()
        .map_err(|error| (key, format!("not a PostgreSQL connection string: {error}")))?;
    if config.get_password().is_some() {
        return Err((
            key,
            "must not contain a password: use database.password_file or JAI_APP_DB_PASSWORD".into(),
        ));
    }
    if config.get_hosts().is_empty() {
        return Err((key, "names no host".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "listen: 127.0.0.1:8080\n\
        admin: {listen: 127.0.0.1:8081}\n\
        database: {write: 'host=127.0.0.1 port=5000 user=jai dbname=jai'}\n\
        cookies: {}\n";

    fn parse(text: &str) -> Result<AppConfig, String> {
        AppConfig::parse(Path::new("app.yaml"), text).map_err(|error| error.to_string())
    }

    #[test]
    fn minimal_file_gets_defaults() {
        let config = parse(GOOD).unwrap();
        assert_eq!(config.database.retry_timeout, Duration::from_secs(15));
        assert_eq!(config.limits.body_bytes, 16 * 1024);
        assert_eq!(config.admin.username, "admin");
    }

    #[test]
    fn unknown_key_is_refused_with_the_file_name() {
        let error = parse(&format!("{GOOD}colour: blue\n")).unwrap_err();
        assert!(error.starts_with("app.yaml: "), "{error}");
        assert!(error.contains("colour"), "{error}");
    }

    #[test]
    fn nested_errors_name_the_dotted_key() {
        let error = parse(&format!("{GOOD}limits:\n  body_bytes: 2048\n  bogus: 3\n")).unwrap_err();
        assert!(
            error.starts_with("app.yaml: limits.bogus: unknown field `bogus`"),
            "{error}"
        );
        assert!(error.ends_with("(line 7)"), "{error}");
        let error =
            parse(&format!("{GOOD}limits:\n  votes_per_ip_per_minute: lots\n")).unwrap_err();
        assert!(
            error.starts_with("app.yaml: limits.votes_per_ip_per_minute: "),
            "{error}"
        );
    }

    #[test]
    fn password_in_connection_string_is_refused() {
        let text = GOOD.replace("user=jai", "user=jai password=hunter2");
        let error = parse(&text).unwrap_err();
        assert!(
            error.starts_with("app.yaml: database.write: must not contain a password"),
            "{error}"
        );
        assert!(!error.contains("hunter2"), "{error}");
    }

    #[test]
    fn same_port_for_admin_is_refused() {
        let text = GOOD.replace("127.0.0.1:8081", "127.0.0.1:8080");
        let error = parse(&text).unwrap_err();
        assert!(error.starts_with("app.yaml: admin.listen: "), "{error}");
    }

    #[test]
    fn zero_durations_and_tiny_limits_are_refused() {
        let error = parse(&format!("{GOOD}cache: {{results_ttl: 0s}}\n")).unwrap_err();
        assert_eq!(
            error,
            "app.yaml: cache.results_ttl: must be greater than zero"
        );
        let error = parse(&format!("{GOOD}limits: {{body_bytes: 10}}\n")).unwrap_err();
        assert_eq!(error, "app.yaml: limits.body_bytes: must be at least 1024");
    }

    #[test]
    fn trusted_proxies_are_addresses_or_blocks() {
        let config = parse(&format!(
            "{GOOD}limits:\n  trusted_proxies: [127.0.0.1, 10.0.0.0/8, '2001:db8::/32']\n"
        ))
        .unwrap();
        assert!(config
            .limits
            .trusted_proxies
            .contains("10.9.8.7".parse().unwrap()));
        assert!(!config
            .limits
            .trusted_proxies
            .contains("11.0.0.1".parse().unwrap()));
        assert!(parse(GOOD).unwrap().limits.trusted_proxies.0.is_empty());
        let error = parse(&format!(
            "{GOOD}limits:\n  trusted_proxies: [haproxy.local]\n"
        ))
        .unwrap_err();
        assert!(
            error.starts_with(
                "app.yaml: limits.trusted_proxies: `haproxy.local` is not an IP address or CIDR block"
            ),
            "{error}"
        );
    }

    #[test]
    fn trust_forwarded_for_is_replaced_by_trusted_proxies() {
        let config = parse(&format!("{GOOD}limits: {{trust_forwarded_for: false}}\n")).unwrap();
        assert!(config.limits.trusted_proxies.0.is_empty());
        let error = parse(&format!("{GOOD}limits: {{trust_forwarded_for: true}}\n")).unwrap_err();
        assert!(
            error.starts_with(
                "app.yaml: limits.trust_forwarded_for: replaced by limits.trusted_proxies"
            ),
            "{error}"
        );
    }

    #[test]
    fn connection_limits_have_defaults_and_bounds() {
        let config = parse(GOOD).unwrap();
        assert_eq!(config.connections, ConnectionsConfig::default());
        assert_eq!(
            config.connections.header_read_timeout,
            Duration::from_secs(10)
        );
        let config = parse(&format!(
            "{GOOD}connections: {{header_read_timeout: 2s, max_connections: 64}}\n"
        ))
        .unwrap();
        assert_eq!(
            config.connections.header_read_timeout,
            Duration::from_secs(2)
        );
        assert_eq!(config.connections.max_connections, 64);
        for (setting, error) in [
            (
                "idle_timeout: 0s",
                "app.yaml: connections.idle_timeout: must be 100ms-1h",
            ),
            (
                "body_read_timeout: 2h",
                "app.yaml: connections.body_read_timeout: must be 100ms-1h",
            ),
            (
                "max_connections: 0",
                "app.yaml: connections.max_connections: must be 1-100000",
            ),
        ] {
            let text = format!("{GOOD}connections: {{{setting}}}\n");
            assert_eq!(parse(&text).unwrap_err(), error);
        }
    }

    #[test]
    fn workers_default_to_the_cores_and_are_bounded() {
        assert_eq!(parse(GOOD).unwrap().workers, None);
        assert_eq!(
            parse(&format!("{GOOD}workers: 1\n")).unwrap().workers,
            Some(1)
        );
        let error = parse(&format!("{GOOD}workers: 0\n")).unwrap_err();
        assert_eq!(error, "app.yaml: workers: must be 1-256");
    }

    /// A configuration whose secrets live in files under `dir`: the cookie
    /// key `key` holds, a valid admin hash, and the `/metrics` token file.
    fn with_secret_files(dir: &Path, key: &str) -> AppConfig {
        let key_file = dir.join("key");
        std::fs::write(&key_file, key).unwrap();
        let hash = dir.join("hash");
        std::fs::write(&hash, crate::auth::hash_password("pw").unwrap()).unwrap();
        let text = GOOD
            .replace(
                "cookies: {}",
                &format!("cookies: {{signing_key_file: {}}}", key_file.display()),
            )
            .replace(
                "admin: {listen: 127.0.0.1:8081}",
                &format!(
                    "admin: {{listen: 127.0.0.1:8081, password_hash_file: {}, metrics_token_file: {}}}",
                    hash.display(),
                    dir.join("token").display()
                ),
            );
        parse(&text).unwrap()
    }

    fn secrets_error(config: &AppConfig) -> String {
        config
            .load_secrets(Path::new("app.yaml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn short_cookie_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let config = with_secret_files(dir.path(), "short\n");
        std::fs::write(dir.path().join("token"), "a-long-enough-scrape-token").unwrap();
        assert_eq!(
            secrets_error(&config),
            "app.yaml: cookies.signing_key_file: the key must be at least 32 bytes"
        );
    }

    #[test]
    fn short_metrics_token_is_refused_and_a_good_one_is_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let config = with_secret_files(dir.path(), &"k".repeat(32));
        let token = dir.path().join("token");
        std::fs::write(&token, "short\n").unwrap();
        assert_eq!(
            secrets_error(&config),
            "app.yaml: admin.metrics_token_file: the token must be at least 16 bytes"
        );
        std::fs::write(&token, "a-long-enough-scrape-token\n").unwrap();
        let secrets = config.load_secrets(Path::new("app.yaml")).unwrap();
        assert_eq!(
            secrets.metrics_token.as_deref(),
            Some("a-long-enough-scrape-token")
        );
    }
}
