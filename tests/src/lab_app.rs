//! The voting app in the lab: `jai-app` instances behind an HTTP frontend of
//! the lab's HAProxy, as the founding document lays out (load balancer → app
//! nodes → PostgreSQL through HAProxy's write and read ports), and a small
//! HTTP client that tests and the benchmark use to drive it like a browser
//! without JavaScript (cookies, hidden form fields, no redirects followed).

use crate::process;
use crate::wait;
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// How to start the app in a lab.
#[derive(Debug, Clone)]
pub struct AppSpec {
    /// Number of `jai-app` instances behind HAProxy.
    pub instances: usize,
    /// `limits.votes_per_voter_per_minute` of every instance.
    pub votes_per_voter_per_minute: u32,
    /// `limits.votes_per_ip_per_minute`: high by default, since every lab
    /// client comes from the same loopback address.
    pub votes_per_ip_per_minute: u32,
    /// `cache.results_ttl`.
    pub results_ttl: Duration,
    /// `workers` of every instance. `None`: the machine's cores divided
    /// among the instances (at least one), since they share those cores —
    /// with PostgreSQL, HAProxy and etcd — where each app node of the
    /// founding document has its own.
    pub workers: Option<usize>,
    /// `log.format` of every instance.
    pub log_format: jai_proto::logging::LogFormat,
    /// `connections.header_read_timeout` (None: the app's default).
    pub header_read_timeout: Option<Duration>,
    /// `connections.max_connections` of each listener (None: the app's default).
    pub max_connections: Option<usize>,
}

impl Default for AppSpec {
    fn default() -> Self {
        Self {
            instances: 2,
            votes_per_voter_per_minute: 30,
            votes_per_ip_per_minute: 1_000_000,
            results_ttl: Duration::from_secs(2),
            workers: None,
            log_format: jai_proto::logging::LogFormat::Text,
            header_read_timeout: None,
            max_connections: None,
        }
    }
}

/// `lab.json`'s `app`: where the site and its admin interface answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppInfo {
    /// The public site through HAProxy's HTTP frontend.
    pub url: String,
    /// The admin interface (of the first instance: the "admin node").
    pub admin_url: String,
    /// Admin user name.
    pub admin_user: String,
    /// File (0600) holding the admin password generated for this lab.
    pub admin_password_file: PathBuf,
    /// File (0600) holding the bearer token `/metrics` requires.
    #[serde(default)]
    pub metrics_token_file: PathBuf,
    /// The instances.
    pub instances: Vec<AppInstance>,
}

/// One `jai-app` process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppInstance {
    /// Instance name (`app1`, …).
    pub name: String,
    /// Its public listener, direct (bypassing HAProxy).
    pub url: String,
    /// Its admin listener.
    pub admin_url: String,
    /// Its configuration file.
    pub config: PathBuf,
    /// Its log.
    pub log: PathBuf,
    /// Process ID while running.
    pub pid: Option<i32>,
}

/// Ports the app part of a lab needs: the frontend and two per instance.
pub fn ports_needed(spec: Option<&AppSpec>) -> usize {
    spec.map_or(0, |spec| 1 + 2 * spec.instances)
}

/// Lays out the app part of a lab at `host`, taking ports from `next_port`.
pub fn plan(dir: &Path, host: &str, spec: &AppSpec, mut next_port: impl FnMut() -> u16) -> AppInfo {
    let url = format!("http://{host}:{}", next_port());
    let instances: Vec<AppInstance> = (1..=spec.instances)
        .map(|index| {
            let name = format!("app{index}");
            let app_dir = dir.join("app").join(&name);
            AppInstance {
                url: format!("http://{host}:{}", next_port()),
                admin_url: format!("http://{host}:{}", next_port()),
                config: app_dir.join("app.yaml"),
                log: app_dir.join("app.log"),
                pid: None,
                name,
            }
        })
        .collect();
    AppInfo {
        url,
        admin_url: instances[0].admin_url.clone(),
        admin_user: "admin".into(),
        admin_password_file: dir.join("secrets/app-admin-password"),
        metrics_token_file: dir.join("secrets/app-metrics-token"),
        instances,
    }
}

fn host_port(url: &str) -> &str {
    url.trim_start_matches("http://")
}

fn host_of(url: &str) -> &str {
    let host_port = host_port(url);
    host_port
        .rsplit_once(':')
        .map_or(host_port, |(host, _)| host)
}

/// HAProxy's HTTP frontend over the instances (appended to haproxy.cfg).
///
/// A voter goes to the instance the hash of their voter cookie picks
/// (consistent hashing: an instance going away moves only its own voters), so
/// the per-voter rate limit, kept in each instance's memory, holds across
/// instances; requests without the cookie (first visits) go round robin.
/// HAProxy connects from the lab's address (`source`), the one the instances
/// list in `limits.trusted_proxies`: a client connecting to an instance
/// directly comes from elsewhere (127.0.0.1), so its `X-Forwarded-For` is
/// not believed.
pub fn haproxy_section(app: &AppInfo, check_interval: Duration) -> String {
    let inter = check_interval.as_millis();
    let mut cfg = format!(
        "listen jai_http\n    mode http\n    bind {bind}\n    balance hash req.cook(jai_voter)\n    \
         hash-type consistent\n    source {source}\n    \
         option forwardfor\n    option httpchk\n    http-check send meth GET uri /healthz\n    \
         http-check expect status 200\n    timeout client 30s\n    timeout server 30s\n    \
         default-server inter {inter}ms fastinter {inter}ms downinter {inter}ms fall 2 rise 1\n",
        bind = host_port(&app.url),
        source = host_of(&app.url),
    );
    for instance in &app.instances {
        let _ = writeln!(
            cfg,
            "    server {} {} check",
            instance.name,
            host_port(&instance.url)
        );
    }
    cfg
}

/// What the app's configuration needs to know of the lab.
pub struct Database<'a> {
    /// HAProxy write port.
    pub write: &'a str,
    /// HAProxy read port.
    pub read: &'a str,
    /// Application role.
    pub user: &'a str,
    /// Its password.
    pub password: &'a str,
    /// Application database.
    pub database: &'a str,
}

/// Writes the secrets and configurations and starts every instance.
pub fn start(
    dir: &Path,
    app: &mut AppInfo,
    spec: &AppSpec,
    binary: &Path,
    db: &Database<'_>,
) -> Result<()> {
    let secrets = dir.join("secrets");
    let password = crate::lab::random_password();
    crate::lab::write_secret(&app.admin_password_file, &password)?;
    crate::lab::write_secret(&app.metrics_token_file, &crate::lab::random_password())?;
    crate::lab::write_secret(
        &secrets.join("app-admin-hash"),
        &hash_password(binary, &password)?,
    )?;
    crate::lab::write_secret(
        &secrets.join("app-cookie-key"),
        &crate::lab::random_password().repeat(2),
    )?;
    crate::lab::write_secret(&secrets.join("app-db-password"), db.password)?;
    for instance in &mut app.instances {
        let app_dir = instance
            .config
            .parent()
            .expect("config lives in the app dir");
        std::fs::create_dir_all(app_dir)?;
        std::fs::write(&instance.config, app_yaml(instance, spec, db, &secrets))
            .with_context(|| format!("writing {}", instance.config.display()))?;
        let mut command = Command::new(binary);
        command.arg("--config").arg(&instance.config);
        instance.pid = Some(process::spawn_logged(command, &instance.log)?);
    }
    Ok(())
}

fn app_yaml(instance: &AppInstance, spec: &AppSpec, db: &Database<'_>, secrets: &Path) -> String {
    let (write_host, write_port) = db.write.rsplit_once(':').unwrap_or_default();
    let (read_host, read_port) = db.read.rsplit_once(':').unwrap_or_default();
    format!(
        "# Written by jai-lab.\n\
         listen: {listen}\n\
         admin:\n  listen: {admin}\n  username: admin\n  password_hash_file: {secrets}/app-admin-hash\n  \
         metrics_token_file: {secrets}/app-metrics-token\n\
         database:\n  write: \"host={write_host} port={write_port} user={user} dbname={database}\"\n  \
         read: \"host={read_host} port={read_port} user={user} dbname={database}\"\n  \
         password_file: {secrets}/app-db-password\n\
         cookies:\n  signing_key_file: {secrets}/app-cookie-key\n\
         cache:\n  results_ttl: {ttl}\n\
         limits:\n  trusted_proxies: [{proxy}]\n  votes_per_voter_per_minute: {voter}\n  votes_per_ip_per_minute: {ip}\n\
         {connections}\
         workers: {workers}\n\
         log:\n  format: {log_format}\n",
        proxy = host_of(&instance.url),
        connections = connections_yaml(spec),
        listen = host_port(&instance.url),
        admin = host_port(&instance.admin_url),
        secrets = secrets.display(),
        user = db.user,
        database = db.database,
        ttl = humantime::format_duration(spec.results_ttl),
        voter = spec.votes_per_voter_per_minute,
        ip = spec.votes_per_ip_per_minute,
        workers = spec.workers.unwrap_or_else(|| {
            let cores = std::thread::available_parallelism().map_or(1, |cores| cores.get());
            (cores / spec.instances.max(1)).max(1)
        }),
        log_format = spec.log_format.name(),
    )
}

/// The `connections` section, when the spec sets any of it.
fn connections_yaml(spec: &AppSpec) -> String {
    let mut lines = String::new();
    if let Some(timeout) = spec.header_read_timeout {
        let _ = writeln!(
            lines,
            "  header_read_timeout: {}",
            humantime::format_duration(timeout)
        );
    }
    if let Some(max) = spec.max_connections {
        let _ = writeln!(lines, "  max_connections: {max}");
    }
    if lines.is_empty() {
        lines
    } else {
        format!("connections:\n{lines}")
    }
}

/// Runs `jai-app hash-password` with the password on its standard input.
fn hash_password(binary: &Path, password: &str) -> Result<String> {
    use std::io::Write;
    let mut child = Command::new(binary)
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {} hash-password", binary.display()))?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(password.as_bytes())?;
    let output = child.wait_with_output()?;
    anyhow::ensure!(
        output.status.success(),
        "jai-app hash-password: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8(output.stdout)?.trim().to_owned())
}

/// Stops the instances gracefully (they flush counted views), then by force.
pub fn stop(app: &mut AppInfo) {
    for instance in &mut app.instances {
        if let Some(pid) = instance.pid.take() {
            process::terminate(pid, Duration::from_secs(10));
        }
    }
}

/// Waits until every instance and the HAProxy frontend answer `/healthz`.
pub async fn wait_ready(app: &AppInfo, timeout: Duration) -> Result<()> {
    let client = AppClient::new()?;
    let mut urls: Vec<&str> = app
        .instances
        .iter()
        .map(|instance| instance.url.as_str())
        .collect();
    urls.push(&app.url);
    for url in urls {
        wait::until(&format!("{url}/healthz to answer 200"), timeout, || {
            let client = &client;
            async move {
                let response = client.get(&format!("{url}/healthz")).await?;
                Ok((response.status == 200).then_some(()))
            }
        })
        .await?;
    }
    Ok(())
}

/// Finds `jai-app` like the agent binary: beside this program or one level up.
pub fn find_binary(bin_dir: Option<&Path>) -> Result<PathBuf> {
    crate::lab::find_binary("jai-app", bin_dir)
}

/// A response, read whole.
#[derive(Debug, Clone)]
pub struct Page {
    /// Status code.
    pub status: u16,
    /// `Location`, for redirects.
    pub location: Option<String>,
    /// `Cache-Control`.
    pub cache_control: Option<String>,
    /// The body.
    pub body: String,
}

impl Page {
    /// The `value` of the first hidden/input field named `name`.
    pub fn field(&self, name: &str) -> Option<String> {
        let marker = format!("name=\"{name}\" value=\"");
        let start = self.body.find(&marker)? + marker.len();
        let end = self.body[start..].find('"')?;
        Some(self.body[start..start + end].to_owned())
    }

    /// Every `value` of radio inputs named `name`, in page order.
    pub fn radio_values(&self, name: &str) -> Vec<String> {
        let marker = format!("type=\"radio\" name=\"{name}\" value=\"");
        self.body
            .match_indices(&marker)
            .filter_map(|(at, _)| {
                let start = at + marker.len();
                let end = self.body[start..].find('"')?;
                Some(self.body[start..start + end].to_owned())
            })
            .collect()
    }
}

/// A browser-like client with its own cookie jar; follows no redirects.
#[derive(Debug, Clone)]
pub struct AppClient {
    http: reqwest::Client,
    /// Cookie name → value.
    pub cookies: BTreeMap<String, String>,
}

impl AppClient {
    /// A client with an empty cookie jar.
    pub fn new() -> Result<Self> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30))
            .build()?;
        Ok(Self {
            http,
            cookies: BTreeMap::new(),
        })
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    async fn read(&mut self, response: reqwest::Response) -> Result<Page> {
        for value in response.headers().get_all(reqwest::header::SET_COOKIE) {
            let text = value.to_str().unwrap_or_default();
            let pair = text.split(';').next().unwrap_or_default();
            if let Some((name, value)) = pair.split_once('=') {
                if value.is_empty() {
                    self.cookies.remove(name);
                } else {
                    self.cookies.insert(name.to_owned(), value.to_owned());
                }
            }
        }
        let header = |name| {
            response
                .headers()
                .get(name)
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned)
        };
        let location = header(reqwest::header::LOCATION);
        let cache_control = header(reqwest::header::CACHE_CONTROL);
        let status = response.status().as_u16();
        Ok(Page {
            status,
            location,
            cache_control,
            body: response.text().await?,
        })
    }

    /// `GET url`.
    pub async fn get(&self, url: &str) -> Result<Page> {
        let mut this = self.clone();
        this.get_mut(url).await
    }

    /// `GET url` with `Authorization: Bearer TOKEN` (no cookies).
    pub async fn get_with_bearer(&self, url: &str, token: &str) -> Result<Page> {
        let response = self
            .http
            .get(url)
            .bearer_auth(token)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        let mut this = self.clone();
        this.read(response).await
    }

    /// `GET url`, keeping cookies the server sets.
    pub async fn get_mut(&mut self, url: &str) -> Result<Page> {
        let response = self
            .http
            .get(url)
            .header(reqwest::header::COOKIE, self.cookie_header())
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        self.read(response).await
    }

    /// `GET url` until it answers 200 (a new poll reaches the replicas and
    /// the app's caches within seconds), keeping cookies.
    pub async fn get_ok(&mut self, url: &str, timeout: Duration) -> Result<Page> {
        let start = std::time::Instant::now();
        loop {
            let page = self.get_mut(url).await?;
            if page.status == 200 {
                return Ok(page);
            }
            if start.elapsed() > timeout {
                bail!("GET {url} still answers {} after {timeout:?}", page.status);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `POST url` with a form body (`application/x-www-form-urlencoded`).
    pub async fn post(&mut self, url: &str, fields: &[(&str, &str)]) -> Result<Page> {
        let body = fields
            .iter()
            .map(|(name, value)| format!("{}={}", encode(name), encode(value)))
            .collect::<Vec<_>>()
            .join("&");
        self.post_raw(url, body).await
    }

    /// `POST url` with an already encoded form body.
    pub async fn post_raw(&mut self, url: &str, body: String) -> Result<Page> {
        let response = self
            .http
            .post(url)
            .header(reqwest::header::COOKIE, self.cookie_header())
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(body)
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        self.read(response).await
    }

    /// Logs in to the admin interface at `admin_url`.
    pub async fn admin_login(&mut self, admin_url: &str, user: &str, password: &str) -> Result<()> {
        let login = self.get_mut(&format!("{admin_url}/login")).await?;
        let csrf = login
            .field("csrf")
            .ok_or_else(|| anyhow!("login page without csrf"))?;
        let done = self
            .post(
                &format!("{admin_url}/login"),
                &[("csrf", &csrf), ("username", user), ("password", password)],
            )
            .await?;
        if done.status != 303 {
            bail!("admin login answered {}: {}", done.status, done.body);
        }
        Ok(())
    }

    /// Creates a poll through the admin interface; returns its id.
    pub async fn create_poll(
        &mut self,
        admin_url: &str,
        title: &str,
        options: &[&str],
        allow_revote: bool,
    ) -> Result<i64> {
        let form = self.get_mut(&format!("{admin_url}/polls/new")).await?;
        let csrf = form
            .field("csrf")
            .ok_or_else(|| anyhow!("new-poll page without csrf: {}", form.status))?;
        let joined = options.join("\n");
        let mut fields = vec![
            ("csrf", csrf.as_str()),
            ("title", title),
            ("options", joined.as_str()),
        ];
        if allow_revote {
            fields.push(("allow_revote", "1"));
        }
        let created = self.post(&format!("{admin_url}/polls"), &fields).await?;
        let location = created.location.ok_or_else(|| {
            anyhow!(
                "poll creation answered {}: {}",
                created.status,
                created.body
            )
        })?;
        location
            .rsplit('/')
            .next()
            .and_then(|id| id.parse().ok())
            .ok_or_else(|| anyhow!("unexpected location {location}"))
    }
}

/// Reads the lab's admin password.
pub fn admin_password(app: &AppInfo) -> Result<String> {
    crate::lab::read_secret(&app.admin_password_file)
}

/// `GET /metrics` of `admin_url`, with the lab's scrape token.
pub async fn scrape_metrics(app: &AppInfo, admin_url: &str) -> Result<Page> {
    let token = crate::lab::read_secret(&app.metrics_token_file)?;
    AppClient::new()?
        .get_with_bearer(&format!("{admin_url}/metrics"), &token)
        .await
}

/// Percent-encoding for form bodies.
pub fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(byte as char)
            }
            b' ' => out.push('+'),
            _ => {
                let _ = write!(out, "%{byte:02X}");
            }
        }
    }
    out
}
