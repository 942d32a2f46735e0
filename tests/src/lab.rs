//! A whole jai cluster on one machine: etcd, one agent (and PostgreSQL) per
//! node, and HAProxy, all bound to a loopback address of the lab's own
//! (`127.X.Y.1`), so several labs run side by side without port clashes.

use crate::lab_app::{AppInfo, AppSpec};
use crate::process::{self, is_alive};
use crate::wait;
use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// What to start.
#[derive(Debug, Clone)]
pub struct LabSpec {
    /// Everything the lab writes goes under this directory.
    pub dir: PathBuf,
    /// The cluster name (etcd prefix `/jai/<cluster>/`).
    pub cluster: String,
    /// Number of PostgreSQL nodes.
    pub nodes: usize,
    /// Number of etcd members to start (ignored with `external_etcd`).
    pub etcd_members: usize,
    /// Use these etcd endpoints instead of starting etcd.
    pub external_etcd: Option<Vec<String>>,
    /// HAProxy health-check interval.
    pub haproxy_check_interval: Duration,
    /// How long `up` may take to reach a healthy cluster.
    pub timeout: Duration,
    /// Directory holding the `jai-agent` binary; found beside this program by default.
    pub bin_dir: Option<PathBuf>,
    /// Nodes are named `<prefix>1`, `<prefix>2`, …
    pub node_prefix: String,
    /// Reuse the database passwords of the lab in this directory (to join its cluster).
    pub secrets_from: Option<PathBuf>,
    /// The cluster config the bootstrapping member seeds (`bootstrap.dcs`).
    pub dcs: Option<jai_proto::DynamicConfig>,
    /// Tags per node name.
    pub tags: BTreeMap<String, jai_proto::Tags>,
    /// More HAProxy runtime API sockets (Unix path or `HOST:PORT`) every agent
    /// pushes to besides the lab's HAProxy: e.g. one nobody answers on.
    pub haproxy_extra_sockets: Vec<String>,
    /// Start the voting app (`jai-app` instances behind HAProxy's HTTP frontend).
    pub app: Option<AppSpec>,
    /// Prepare the chaos faults of `faults.rs`: each node's agent (and so its
    /// PostgreSQL) runs in a cgroup of its own, so firewall rules can cut two
    /// members apart, and each data directory lives on a small tmpfs of its
    /// own, so it can be filled up. Needs root.
    pub chaos: bool,
    /// The agents' `log.format` (the app's is in [`AppSpec`]).
    pub agent_log_format: jai_proto::logging::LogFormat,
    /// `postgresql.reclone_on_rewind_failure` of every agent.
    pub reclone_on_rewind_failure: bool,
    /// Backups with pgBackRest: a repository under `DIR/backup/repo` and the
    /// cluster config's `backup` section (unless `dcs` has its own).
    pub backup: bool,
}

impl LabSpec {
    /// A lab of `nodes` nodes in `dir`, with the defaults of `jai-lab up`.
    pub fn new(dir: impl Into<PathBuf>, nodes: usize) -> Self {
        Self {
            dir: dir.into(),
            cluster: "jai".into(),
            nodes,
            etcd_members: 3,
            external_etcd: None,
            haproxy_check_interval: Duration::from_secs(1),
            timeout: Duration::from_secs(180),
            bin_dir: None,
            node_prefix: "pg".into(),
            secrets_from: None,
            dcs: None,
            tags: BTreeMap::new(),
            haproxy_extra_sockets: Vec::new(),
            app: None,
            chaos: false,
            agent_log_format: jai_proto::logging::LogFormat::Text,
            reclone_on_rewind_failure: false,
            backup: true,
        }
    }

    /// The cluster config the bootstrapping member seeds: `dcs`, with a
    /// `backup` section for the lab's repository when backups are on.
    fn bootstrap_dcs(&self, repo: &Path) -> Option<jai_proto::DynamicConfig> {
        if !self.backup {
            return self.dcs.clone();
        }
        let mut dcs = self.dcs.clone().unwrap_or_default();
        dcs.backup.get_or_insert_with(|| jai_proto::BackupSettings {
            stanza: self.cluster.clone(),
            repo_path: repo.to_owned(),
            process_max: 1,
            ..Default::default()
        });
        Some(dcs)
    }
}

/// Where the lab's backups are (`lab.json`'s `backup`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupInfo {
    /// pgBackRest's stanza.
    pub stanza: String,
    /// The repository's directory.
    pub repo: PathBuf,
    /// A pgBackRest config file that reaches the repository
    /// (`pgbackrest --config=THIS --stanza=STANZA info`): the first node's.
    pub config: PathBuf,
}

/// `DIR/lab.json`: the description scripts and tests rely on (docs/lab.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabDescription {
    /// Cluster name.
    pub cluster: String,
    /// The lab directory.
    pub dir: PathBuf,
    /// The loopback address every service of this lab binds to.
    pub host: String,
    /// etcd client URLs.
    pub etcd: Vec<String>,
    /// The etcd members this lab started (empty when it joined an external etcd).
    pub etcd_members: Vec<EtcdMember>,
    /// How to connect to the application database.
    pub postgres: PostgresAccess,
    /// The load balancer.
    pub haproxy: HaproxyInfo,
    /// The PostgreSQL nodes.
    pub nodes: Vec<NodeInfo>,
    /// The iptables chain the lab created to cut nodes off etcd, if any.
    #[serde(default)]
    pub firewall_chain: Option<String>,
    /// The voting app, when the lab runs it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<AppInfo>,
    /// `jaictl -c THIS status` works against the lab.
    #[serde(default)]
    pub jaictl_config: PathBuf,
    /// File holding the control token the agents' gRPC API requires.
    #[serde(default)]
    pub control_token_file: PathBuf,
    /// What a chaos lab (`LabSpec::chaos`) set up and `down` removes.
    #[serde(default)]
    pub chaos: crate::faults::ChaosState,
    /// The backup repository, when the lab has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupInfo>,
}

/// One etcd member started by the lab.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EtcdMember {
    /// Member name.
    pub name: String,
    /// Client URL.
    pub client_url: String,
    /// Peer URL.
    pub peer_url: String,
    /// Process ID.
    pub pid: Option<i32>,
    /// Data directory.
    pub data_dir: PathBuf,
    /// An extra client URL per node: node NAME's agent talks to this member
    /// only through it, so a firewall rule on its port cuts that node off.
    #[serde(default)]
    pub node_urls: BTreeMap<String, String>,
}

/// Credentials of the application role, and where the superuser's live.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PostgresAccess {
    /// Application role.
    pub user: String,
    /// File holding its password (0600 in the 0700 secrets directory):
    /// lab.json itself holds no secret.
    pub password_file: PathBuf,
    /// Application database.
    pub database: String,
    /// The superuser role the agents use.
    pub superuser: String,
    /// File holding the superuser's password.
    pub superuser_password_file: PathBuf,
}

impl PostgresAccess {
    /// The application role's password, read from its file.
    pub fn password(&self) -> Result<String> {
        read_secret(&self.password_file)
    }
}

/// HAProxy's listeners and admin socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HaproxyInfo {
    /// `HOST:PORT` routed to the primary.
    pub write: String,
    /// `HOST:PORT` balanced over the replicas.
    pub read: String,
    /// Admin-level runtime API socket.
    pub stats_socket: PathBuf,
    /// Its configuration file.
    pub config: PathBuf,
    /// Process ID.
    pub pid: Option<i32>,
    /// More runtime API sockets the agents push to (`LabSpec::haproxy_extra_sockets`).
    #[serde(default)]
    pub extra_sockets: Vec<String>,
    /// Health-check interval of its servers, in milliseconds.
    #[serde(default)]
    pub check_interval_ms: u64,
}

/// One PostgreSQL node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Member name.
    pub name: String,
    /// `HOST:PORT` of its PostgreSQL.
    pub pg: String,
    /// Base URL of its agent's HTTP API.
    pub api: String,
    /// Base URL of its agent's gRPC control API.
    #[serde(default)]
    pub grpc: String,
    /// PostgreSQL data directory.
    pub data_dir: PathBuf,
    /// The agent's configuration file.
    pub config: PathBuf,
    /// The agent's log.
    pub log: PathBuf,
    /// The agent's PID; `null` while the node is stopped.
    pub agent_pid: Option<i32>,
    /// The agent is frozen by SIGSTOP.
    #[serde(default)]
    pub frozen: bool,
    /// The etcd endpoints its agent uses.
    #[serde(default)]
    pub etcd: Vec<String>,
    /// Its PostgreSQL is frozen by SIGSTOP (`freeze_postgres`).
    #[serde(default)]
    pub postgres_frozen: bool,
    /// The mount point of the node's own small disk holding `data_dir`
    /// (chaos labs only).
    #[serde(default)]
    pub disk: Option<PathBuf>,
}

impl NodeInfo {
    /// The agent's `state_dir` (next to its configuration file).
    pub fn state_dir(&self) -> PathBuf {
        self.config
            .parent()
            .map_or_else(|| PathBuf::from("state"), |dir| dir.join("state"))
    }
}

/// How `stop-node` stops a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    /// The agent and its PostgreSQL die at once, as when the machine dies.
    Kill,
    /// The agent shuts down gracefully (stops PostgreSQL, releases its keys).
    Term,
    /// The agent is frozen (SIGSTOP of its process: every thread), not its
    /// fence keeper; PostgreSQL keeps running until the keeper stops it at
    /// the lease's fencing point. `start-node` thaws the agent.
    Stop,
    /// The agent frozen as with `Stop`, and its fence keeper killed: its
    /// PostgreSQL keeps running with nothing to fence it. Two faults at once,
    /// for tests that need a former primary with writes the new leader never
    /// had. `start-node` thaws the agent, which starts a new keeper.
    StopUnfenced,
    /// Only the agent dies (SIGKILL); PostgreSQL keeps running.
    KillAgent,
    /// Only the postmaster dies (SIGKILL): a PostgreSQL crash under a live agent.
    KillPostgres,
}

impl std::str::FromStr for StopSignal {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text.to_ascii_uppercase().trim_start_matches("SIG") {
            "KILL" => Ok(Self::Kill),
            "TERM" => Ok(Self::Term),
            "STOP" => Ok(Self::Stop),
            "STOP-UNFENCED" => Ok(Self::StopUnfenced),
            "KILL-AGENT" => Ok(Self::KillAgent),
            "KILL-PG" => Ok(Self::KillPostgres),
            _ => Err(format!(
                "{text:?}: expected KILL, TERM, STOP, STOP-UNFENCED, KILL-AGENT or KILL-PG"
            )),
        }
    }
}

/// A running lab. Dropping a lab that `up` started in this process kills
/// everything it started (tests clean up even when they fail).
pub struct Lab {
    /// The description, as in `lab.json`.
    pub desc: LabDescription,
    owned: bool,
    http: reqwest::Client,
}

/// The directories a lab writes under DIR, and the only ones `up` removes.
const LAB_SUBDIRS: &[&str] = &[
    "secrets",
    "etcd",
    "nodes",
    "haproxy",
    "logs",
    "app",
    "backup",
    "backup/repo",
];

const SUPERUSER: &str = "postgres";
/// The role standbys stream as.
pub const REPLICATION_USER: &str = "replicator";
const APP_USER: &str = "jai";
const APP_DATABASE: &str = "jai";

impl Lab {
    /// Starts a lab and waits until it is healthy.
    pub async fn up(spec: LabSpec) -> Result<Lab> {
        let mut lab = Self::launch(&spec)?;
        lab.wait_healthy(spec.timeout).await?;
        lab.create_app_database().await?;
        if let Some(app_spec) = &spec.app {
            lab.start_app(app_spec, spec.bin_dir.as_deref())?;
            let app = lab.desc.app.as_ref().expect("planned with the spec");
            crate::lab_app::wait_ready(app, spec.timeout).await?;
        }
        Ok(lab)
    }

    /// Opens the lab described by `DIR/lab.json`.
    pub fn open(dir: &Path) -> Result<Lab> {
        let file = dir.join("lab.json");
        let text = std::fs::read_to_string(&file).with_context(|| {
            format!(
                "no lab in {}: cannot read {}",
                dir.display(),
                file.display()
            )
        })?;
        let desc =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
        Ok(Lab {
            desc,
            owned: false,
            http: http_client(),
        })
    }

    /// Keep everything running when this value is dropped (the CLI's `up`).
    pub fn detach(&mut self) {
        self.owned = false;
    }

    /// Starts a lab without waiting for it to become healthy (for clusters
    /// that join another lab's etcd and have no primary of their own).
    pub fn launch(spec: &LabSpec) -> Result<Lab> {
        anyhow::ensure!(spec.nodes >= 1, "--nodes must be at least 1");
        anyhow::ensure!(
            spec.external_etcd.is_some() || spec.etcd_members >= 1,
            "--etcd-members must be at least 1"
        );
        let dir = absolute(&spec.dir)?;
        if dir.join("lab.json").exists() {
            let mut existing = Lab::open(&dir)?;
            if existing.any_alive() {
                bail!(
                    "a lab is already running in {}: run `jai-lab down --dir {}` first",
                    dir.display(),
                    dir.display()
                );
            }
            // A stopped lab is replaced by a fresh one: remove what it wrote,
            // firewall rules, mounts and cgroups included.
            existing.remove_firewall_chain();
            existing.release_chaos_setup();
            for sub in LAB_SUBDIRS {
                let path = dir.join(sub);
                if path.exists() {
                    std::fs::remove_dir_all(&path)
                        .with_context(|| format!("removing {}", path.display()))?;
                }
            }
            std::fs::remove_file(dir.join("lab.json"))?;
        }
        for sub in [""].iter().chain(LAB_SUBDIRS) {
            std::fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        std::fs::set_permissions(dir.join("secrets"), std::fs::Permissions::from_mode(0o700))?;
        let run_as = nix::unistd::Uid::effective()
            .is_root()
            .then_some("postgres");
        if run_as.is_some() {
            check_reachable_by_others(&dir)?;
            for sub in ["", "nodes"] {
                std::fs::set_permissions(dir.join(sub), std::fs::Permissions::from_mode(0o755))?;
            }
        }
        let host = pick_loopback_host()?;
        let agent_bin = find_agent_binary(spec.bin_dir.as_deref())?;

        let superuser_file = dir.join("secrets/superuser");
        let replication_file = dir.join("secrets/replication");
        for file in [&superuser_file, &replication_file] {
            let secret = match &spec.secrets_from {
                Some(other) => {
                    let source = other
                        .join("secrets")
                        .join(file.file_name().expect("named file"));
                    std::fs::read_to_string(&source)
                        .with_context(|| format!("reading {}", source.display()))?
                        .trim()
                        .to_owned()
                }
                None => random_password(),
            };
            write_secret(file, &secret)?;
        }
        let app_password_file = dir.join("secrets/app-role-password");
        write_secret(&app_password_file, &random_password())?;
        let control_token_file = dir.join("secrets/control-token");
        write_secret(&control_token_file, &random_password())?;

        let node_names: Vec<String> = (1..=spec.nodes)
            .map(|index| format!("{}{index}", spec.node_prefix))
            .collect();
        let port_count = spec.etcd_members * (2 + spec.nodes)
            + spec.nodes * 3
            + 2
            + crate::lab_app::ports_needed(spec.app.as_ref());
        let mut ports = free_ports(host, port_count)?.into_iter();
        let mut next_port = || ports.next().expect("enough ports allocated");

        let etcd_members: Vec<EtcdMember> = if spec.external_etcd.is_some() {
            Vec::new()
        } else {
            (1..=spec.etcd_members)
                .map(|index| {
                    let name = format!("etcd{index}");
                    EtcdMember {
                        client_url: format!("http://{host}:{}", next_port()),
                        peer_url: format!("http://{host}:{}", next_port()),
                        data_dir: dir.join("etcd").join(&name),
                        name,
                        pid: None,
                        node_urls: node_names
                            .iter()
                            .map(|node| (node.clone(), format!("http://{host}:{}", next_port())))
                            .collect(),
                    }
                })
                .collect()
        };
        let etcd: Vec<String> = match &spec.external_etcd {
            Some(endpoints) => endpoints.clone(),
            None => etcd_members
                .iter()
                .map(|member| member.client_url.clone())
                .collect(),
        };
        let nodes: Vec<NodeInfo> = node_names
            .into_iter()
            .map(|name| {
                let node_dir = dir.join("nodes").join(&name);
                let disk = spec.chaos.then(|| node_dir.join("disk"));
                let node_etcd = if etcd_members.is_empty() {
                    etcd.clone()
                } else {
                    etcd_members
                        .iter()
                        .map(|member| member.node_urls[&name].clone())
                        .collect()
                };
                NodeInfo {
                    etcd: node_etcd,
                    pg: format!("{host}:{}", next_port()),
                    api: format!("http://{host}:{}", next_port()),
                    grpc: format!("http://{host}:{}", next_port()),
                    data_dir: disk.as_ref().unwrap_or(&node_dir).join("data"),
                    disk,
                    postgres_frozen: false,
                    config: node_dir.join("agent.yaml"),
                    log: node_dir.join("agent.log"),
                    agent_pid: None,
                    frozen: false,
                    name,
                }
            })
            .collect();
        let haproxy = HaproxyInfo {
            write: format!("{host}:{}", next_port()),
            read: format!("{host}:{}", next_port()),
            stats_socket: dir.join("haproxy/admin.sock"),
            config: dir.join("haproxy/haproxy.cfg"),
            pid: None,
            extra_sockets: spec.haproxy_extra_sockets.clone(),
            check_interval_ms: spec.haproxy_check_interval.as_millis() as u64,
        };
        let app = spec.app.as_ref().map(|app_spec| {
            crate::lab_app::plan(&dir, &host.to_string(), app_spec, &mut next_port)
        });
        let mut lab = Lab {
            desc: LabDescription {
                cluster: spec.cluster.clone(),
                dir: dir.clone(),
                host: host.to_string(),
                etcd,
                etcd_members,
                postgres: PostgresAccess {
                    user: APP_USER.into(),
                    password_file: app_password_file,
                    database: APP_DATABASE.into(),
                    superuser: SUPERUSER.into(),
                    superuser_password_file: superuser_file.clone(),
                },
                haproxy,
                nodes,
                firewall_chain: None,
                app,
                jaictl_config: dir.join("jaictl.yaml"),
                control_token_file: control_token_file.clone(),
                chaos: Default::default(),
                backup: None,
            },
            owned: true,
            http: http_client(),
        };
        // From here on, a failure kills what was started (Drop) and lab.json
        // lets `down` find it too.
        lab.start_etcd()?;
        if spec.backup {
            let repo = dir.join("backup/repo");
            if let Some(user) = run_as {
                let account = nix::unistd::User::from_name(user)?
                    .ok_or_else(|| anyhow!("no OS user {user}"))?;
                nix::unistd::chown(&repo, Some(account.uid), Some(account.gid))?;
            }
            std::fs::set_permissions(&repo, std::fs::Permissions::from_mode(0o750))?;
            lab.desc.backup = Some(BackupInfo {
                stanza: spec.cluster.clone(),
                config: lab.desc.nodes[0].state_dir().join("pgbackrest.conf"),
                repo,
            });
        }
        if spec.chaos {
            lab.prepare_chaos()?;
        }
        for node in &lab.desc.nodes {
            let node_dir = node.config.parent().expect("config lives in the node dir");
            std::fs::create_dir_all(node_dir)?;
            if run_as.is_some() {
                std::fs::set_permissions(node_dir, std::fs::Permissions::from_mode(0o755))?;
            }
            let yaml = agent_yaml(
                &lab.desc,
                node,
                run_as,
                &superuser_file,
                &replication_file,
                spec,
            );
            std::fs::write(&node.config, yaml)
                .with_context(|| format!("writing {}", node.config.display()))?;
        }
        std::fs::write(&lab.desc.jaictl_config, jaictl_yaml(&lab.desc))
            .with_context(|| format!("writing {}", lab.desc.jaictl_config.display()))?;
        std::fs::write(
            &lab.desc.haproxy.config,
            haproxy_cfg(&lab.desc, spec.haproxy_check_interval)?,
        )?;
        std::fs::write(
            dir.join("agent-binary"),
            agent_bin.to_string_lossy().as_bytes(),
        )?;
        for index in 0..lab.desc.nodes.len() {
            lab.spawn_agent(index)?;
        }
        lab.start_haproxy()?;
        lab.save()?;
        Ok(lab)
    }

    fn start_etcd(&mut self) -> Result<()> {
        for index in 0..self.desc.etcd_members.len() {
            self.start_etcd_member(index)?;
        }
        Ok(())
    }

    /// Starts etcd member `index` (again: a member with data rejoins its cluster).
    pub(crate) fn start_etcd_member(&mut self, index: usize) -> Result<()> {
        let initial_cluster = self
            .desc
            .etcd_members
            .iter()
            .map(|member| format!("{}={}", member.name, member.peer_url))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!("jai-lab-{}-{}", self.desc.cluster, std::process::id());
        let log_dir = self.desc.dir.join("logs");
        let member = &mut self.desc.etcd_members[index];
        let mut command = Command::new("etcd");
        command
            .arg("--name")
            .arg(&member.name)
            .arg("--data-dir")
            .arg(&member.data_dir)
            .arg("--listen-client-urls")
            .arg(
                std::iter::once(&member.client_url)
                    .chain(member.node_urls.values())
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(","),
            )
            .arg("--advertise-client-urls")
            .arg(&member.client_url)
            .arg("--listen-peer-urls")
            .arg(&member.peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&member.peer_url)
            .arg("--initial-cluster")
            .arg(&initial_cluster)
            .arg("--initial-cluster-token")
            .arg(&token)
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--heartbeat-interval")
            .arg("100")
            .arg("--election-timeout")
            .arg("1000")
            .arg("--logger")
            .arg("zap")
            .arg("--log-level")
            .arg("warn");
        let log = log_dir.join(format!("{}.log", member.name));
        member.pid = Some(process::spawn_logged(command, &log)?);
        Ok(())
    }

    fn agent_binary(&self) -> Result<PathBuf> {
        let recorded = std::fs::read_to_string(self.desc.dir.join("agent-binary"))
            .context("reading DIR/agent-binary")?;
        Ok(PathBuf::from(recorded.trim()))
    }

    fn spawn_agent(&mut self, index: usize) -> Result<()> {
        let binary = self.agent_binary()?;
        let cgroup = self.node_cgroup_dir(&self.desc.nodes[index].name);
        let node = &mut self.desc.nodes[index];
        let mut command = match cgroup {
            // The agent enters its node's cgroup before it starts (its
            // PostgreSQL inherits it): `exec` keeps the PID.
            Some(cgroup) => {
                let mut command = Command::new("/bin/sh");
                command
                    .arg("-c")
                    .arg("echo $$ > \"$0\"/cgroup.procs && exec \"$1\" --config \"$2\"")
                    .arg(cgroup)
                    .arg(binary);
                command
            }
            None => {
                let mut command = Command::new(binary);
                command.arg("--config");
                command
            }
        };
        command.arg(&node.config);
        node.agent_pid = Some(process::spawn_logged(command, &node.log)?);
        node.frozen = false;
        Ok(())
    }

    fn start_haproxy(&mut self) -> Result<()> {
        let mut command = Command::new("haproxy");
        command.arg("-db").arg("-f").arg(&self.desc.haproxy.config);
        let log = self.desc.dir.join("logs/haproxy.log");
        self.desc.haproxy.pid = Some(process::spawn_logged(command, &log)?);
        Ok(())
    }

    /// Restarts HAProxy with a fresh state (as after a crash or a reload that
    /// lost runtime changes): its servers start from their configuration.
    pub fn restart_haproxy(&mut self) -> Result<()> {
        if let Some(pid) = self.desc.haproxy.pid.take() {
            process::terminate(pid, Duration::from_secs(5));
        }
        self.start_haproxy()?;
        self.save()?;
        // Ready once the socket answers *as the new process*: an answer from
        // an instance still on its way out would be a false start.
        let pid = self.desc.haproxy.pid.expect("started above");
        let answers_as_new = |lab: &Self| {
            lab.haproxy_command("show info").is_ok_and(|info| {
                info.lines()
                    .any(|line| line.trim() == format!("Pid: {pid}"))
            })
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !answers_as_new(self) {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "HAProxy (pid {pid}) did not answer on its admin socket within 10 s; see {}",
                self.desc.dir.join("logs/haproxy.log").display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Sends one command to HAProxy's runtime API and returns its answer.
    pub fn haproxy_command(&self, command: &str) -> Result<String> {
        use std::io::{Read, Write};
        let socket = &self.desc.haproxy.stats_socket;
        let mut stream = std::os::unix::net::UnixStream::connect(socket)
            .with_context(|| format!("connecting to {}", socket.display()))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream.write_all(format!("{command}\n").as_bytes())?;
        let mut answer = String::new();
        match stream.read_to_string(&mut answer) {
            // HAProxy may reset the connection once it has answered.
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => Ok(answer),
            Err(error) => Err(error.into()),
            Ok(_) => Ok(answer),
        }
    }

    /// Writes `DIR/lab.json` (atomically).
    pub fn save(&self) -> Result<()> {
        let file = self.desc.dir.join("lab.json");
        let temp = self.desc.dir.join("lab.json.tmp");
        std::fs::write(&temp, serde_json::to_string_pretty(&self.desc)? + "\n")?;
        std::fs::rename(&temp, &file).with_context(|| format!("writing {}", file.display()))
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Result<&NodeInfo> {
        self.desc
            .nodes
            .iter()
            .find(|node| node.name == name)
            .ok_or_else(|| {
                anyhow!(
                    "no node {name:?} in this lab (nodes: {})",
                    self.node_names().join(", ")
                )
            })
    }

    pub(crate) fn node_index(&self, name: &str) -> Result<usize> {
        let node = self.node(name)?;
        Ok(self
            .desc
            .nodes
            .iter()
            .position(|other| other.name == node.name)
            .expect("found above"))
    }

    /// Names of all nodes.
    pub fn node_names(&self) -> Vec<String> {
        self.desc
            .nodes
            .iter()
            .map(|node| node.name.clone())
            .collect()
    }

    /// Stops one node the way `signal` says, and records it in `lab.json`.
    pub fn stop_node(&mut self, name: &str, signal: StopSignal) -> Result<()> {
        self.stop_nodes(&[name], signal)
    }

    /// Stops several nodes at the same instant (all signalled before any is
    /// waited for), and records it in `lab.json`.
    pub fn stop_nodes(&mut self, names: &[&str], signal: StopSignal) -> Result<()> {
        let indexes = names
            .iter()
            .map(|name| self.node_index(name))
            .collect::<Result<Vec<_>>>()?;
        let mut to_wait = Vec::new();
        for &index in &indexes {
            let node = &mut self.desc.nodes[index];
            let agent = node.agent_pid.filter(|pid| is_alive(*pid));
            match signal {
                StopSignal::Kill | StopSignal::Term | StopSignal::KillAgent => {
                    if signal == StopSignal::Kill {
                        // The machine dies: the agent's fence keeper too.
                        if let Some(keeper) = process::fence_keeper_pid(&node.state_dir()) {
                            process::signal(keeper, Signal::SIGKILL);
                            to_wait.push(keeper);
                        }
                        if let Some(pid) = process::postmaster_pid(&node.data_dir) {
                            // PostgreSQL's children leave the postmaster's
                            // group (setsid): each is killed by PID too, so no
                            // backend outlives the machine's death.
                            let children = crate::process::children_of(pid);
                            process::signal_group(pid, Signal::SIGKILL);
                            for child in children {
                                process::signal(child, Signal::SIGKILL);
                            }
                            to_wait.push(pid);
                        }
                    }
                    if let Some(pid) = agent {
                        // A frozen agent must run again to stop or to die.
                        process::signal(pid, Signal::SIGCONT);
                        let agent_signal = match signal {
                            StopSignal::Term => Signal::SIGTERM,
                            _ => Signal::SIGKILL,
                        };
                        process::signal(pid, agent_signal);
                        to_wait.push(pid);
                    }
                    node.agent_pid = None;
                    node.frozen = false;
                }
                StopSignal::KillPostgres => {
                    let pid = process::postmaster_pid(&node.data_dir)
                        .ok_or_else(|| anyhow!("node {}: PostgreSQL is not running", node.name))?;
                    process::signal_group(pid, Signal::SIGKILL);
                    to_wait.push(pid);
                }
                StopSignal::Stop | StopSignal::StopUnfenced => {
                    let pid =
                        agent.ok_or_else(|| anyhow!("node {}: agent is not running", node.name))?;
                    // The agent's process only: its fence keeper runs in a
                    // process group of its own and is not frozen with it.
                    process::signal(pid, Signal::SIGSTOP);
                    node.frozen = true;
                    if signal == StopSignal::StopUnfenced {
                        // Frozen first, so the agent cannot start a new one.
                        let keeper = process::fence_keeper_pid(&node.state_dir())
                            .ok_or_else(|| anyhow!("node {}: no fence keeper runs", node.name))?;
                        process::signal(keeper, Signal::SIGKILL);
                        to_wait.push(keeper);
                    }
                }
            }
        }
        for pid in to_wait {
            // A graceful stop that hangs is finished by force: the lab must end.
            process::terminate(pid, Duration::from_secs(90));
        }
        self.save()
    }

    /// Starts (or thaws) one node's agent, and records it in `lab.json`.
    pub fn start_node(&mut self, name: &str) -> Result<()> {
        let index = self.node_index(name)?;
        let node = &mut self.desc.nodes[index];
        match node.agent_pid.filter(|pid| is_alive(*pid)) {
            Some(pid) if node.frozen => {
                process::signal(pid, Signal::SIGCONT);
                node.frozen = false;
            }
            Some(pid) => bail!("node {name}: agent already running (pid {pid})"),
            None => self.spawn_agent(index)?,
        }
        self.save()
    }

    /// Cuts node `name` off etcd with firewall rules (iptables DROP on the etcd
    /// ports only its agent uses): a real network partition, not a process kill.
    /// PostgreSQL replication and the node's API stay reachable.
    pub fn cut_from_etcd(&mut self, name: &str) -> Result<()> {
        let ports = self.etcd_ports_of(name)?;
        let chain = self.ensure_firewall_chain()?;
        for port in ports {
            self.drop_rule("-A", &chain, &port)?;
        }
        self.save()
    }

    /// Removes the rules of [`Lab::cut_from_etcd`] for node `name`.
    pub fn heal_etcd(&mut self, name: &str) -> Result<()> {
        let ports = self.etcd_ports_of(name)?;
        let Some(chain) = self.desc.firewall_chain.clone() else {
            return Ok(());
        };
        for port in ports {
            // Absent rules (never cut) are fine: healing is idempotent.
            let _ = self.drop_rule("-D", &chain, &port);
        }
        Ok(())
    }

    /// Appends (`-A`) or deletes (`-D`) the rule dropping TCP to this lab's `port`.
    pub(crate) fn drop_rule(&self, action: &str, chain: &str, port: &str) -> Result<()> {
        iptables(&[
            action,
            chain,
            "-p",
            "tcp",
            "-d",
            &self.desc.host,
            "--dport",
            port,
            "-j",
            "DROP",
        ])
    }

    pub(crate) fn etcd_ports_of(&self, name: &str) -> Result<Vec<String>> {
        self.node(name)?;
        let ports: Vec<String> = self
            .desc
            .etcd_members
            .iter()
            .filter_map(|member| member.node_urls.get(name))
            .filter_map(|url| url.rsplit(':').next().map(str::to_owned))
            .collect();
        anyhow::ensure!(
            !ports.is_empty(),
            "node {name} has no etcd ports of its own (the lab joined an external etcd)"
        );
        Ok(ports)
    }

    fn ensure_firewall_chain(&mut self) -> Result<String> {
        if let Some(chain) = &self.desc.firewall_chain {
            return Ok(chain.clone());
        }
        let chain = format!("JAI-{}", self.desc.host.replace('.', "-"));
        iptables(&["-N", &chain]).context("cutting nodes off etcd needs root and iptables")?;
        iptables(&["-I", "INPUT", "-j", &chain])?;
        self.desc.firewall_chain = Some(chain.clone());
        self.save()?;
        Ok(chain)
    }

    fn remove_firewall_chain(&mut self) {
        if let Some(chain) = self.desc.firewall_chain.take() {
            let _ = iptables(&["-D", "INPUT", "-j", &chain]);
            let _ = iptables(&["-F", &chain]);
            let _ = iptables(&["-X", &chain]);
        }
        self.remove_member_cut_chain();
    }

    /// Stops everything the lab started: agents gracefully, then whatever is left.
    pub fn down(&mut self) -> Result<()> {
        // The app first: it flushes its counted views while PostgreSQL runs.
        if let Some(app) = &mut self.desc.app {
            crate::lab_app::stop(app);
        }
        let agents: Vec<i32> = self
            .desc
            .nodes
            .iter()
            .filter_map(|node| node.agent_pid)
            .collect();
        // A frozen PostgreSQL could not stop gracefully.
        self.thaw_all_postgres();
        for pid in &agents {
            process::signal(*pid, Signal::SIGCONT);
            process::signal(*pid, Signal::SIGTERM);
        }
        for pid in &agents {
            process::terminate(*pid, Duration::from_secs(60));
        }
        self.kill_everything();
        self.save()
    }

    fn kill_everything(&mut self) {
        self.remove_firewall_chain();
        if let Some(app) = &mut self.desc.app {
            crate::lab_app::stop(app);
        }
        self.thaw_all_postgres();
        for node in &mut self.desc.nodes {
            let keeper = process::fence_keeper_pid(&node.state_dir());
            if let Some(pid) = node.agent_pid.take() {
                process::signal(pid, Signal::SIGCONT);
                process::signal(pid, Signal::SIGKILL);
                process::wait_gone(pid, Duration::from_secs(5));
            }
            if let Some(pid) = keeper {
                process::signal(pid, Signal::SIGKILL);
                process::wait_gone(pid, Duration::from_secs(5));
            }
            if let Some(pid) = process::postmaster_pid(&node.data_dir) {
                process::signal(pid, Signal::SIGKILL);
                process::wait_gone(pid, Duration::from_secs(5));
            }
        }
        if let Some(pid) = self.desc.haproxy.pid.take() {
            process::terminate(pid, Duration::from_secs(5));
        }
        for member in &mut self.desc.etcd_members {
            if let Some(pid) = member.pid.take() {
                process::terminate(pid, Duration::from_secs(5));
            }
        }
        self.release_chaos_setup();
    }

    fn any_alive(&self) -> bool {
        let agents = self.desc.nodes.iter().filter_map(|node| node.agent_pid);
        let etcd = self
            .desc
            .etcd_members
            .iter()
            .filter_map(|member| member.pid);
        let apps = self
            .desc
            .app
            .iter()
            .flat_map(|app| app.instances.iter().filter_map(|instance| instance.pid));
        agents
            .chain(apps)
            .chain(etcd)
            .chain(self.desc.haproxy.pid)
            .any(is_alive)
    }

    /// The HTTP status code of `GET {node api}{path}`, or an error if unreachable.
    pub async fn api_code(&self, node: &NodeInfo, path: &str) -> Result<u16> {
        let response = self
            .http
            .get(format!("{}{path}", node.api))
            .send()
            .await
            .with_context(|| format!("{} API unreachable", node.name))?;
        Ok(response.status().as_u16())
    }

    /// `GET {node api}/status` as JSON.
    pub async fn api_status(&self, node: &NodeInfo) -> Result<serde_json::Value> {
        let response = self
            .http
            .get(format!("{}/status", node.api))
            .send()
            .await
            .with_context(|| format!("{} API unreachable", node.name))?;
        Ok(response.json().await?)
    }

    /// The nodes whose agent runs (and is not frozen).
    pub fn running_nodes(&self) -> Vec<&NodeInfo> {
        self.desc
            .nodes
            .iter()
            .filter(|node| !node.frozen && node.agent_pid.is_some_and(is_alive))
            .collect()
    }

    /// One pass of the health check: `Some(primary)` when exactly one running
    /// node passes `/primary`, every other running node passes `/read-only` and
    /// streams from it, and HAProxy's write port reaches it.
    pub async fn healthy_primary(&self) -> Result<Option<String>> {
        let running = self.running_nodes();
        let mut primaries = Vec::new();
        // Replicas by `/read-only`: `noloadbalance` or not (`/replica` refuses
        // those, and a lab with one would never count as healthy).
        for node in &running {
            if self.api_code(node, "/primary").await? == 200 {
                primaries.push(node.name.clone());
            } else if self.api_code(node, "/read-only").await? != 200 {
                return Ok(None);
            }
        }
        let [primary] = primaries.as_slice() else {
            return Ok(None);
        };
        let client = self
            .connect_superuser(&self.desc.haproxy.write, "postgres")
            .await?;
        let row = client
            .query_one(
                "SELECT pg_is_in_recovery(), current_setting('cluster_name'), \
                 (SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming')",
                &[],
            )
            .await?;
        let (in_recovery, name, streaming): (bool, String, i64) =
            (row.get(0), row.get(1), row.get(2));
        let healthy = !in_recovery && &name == primary && streaming as usize == running.len() - 1;
        Ok(healthy.then(|| primary.clone()))
    }

    /// Waits until [`Lab::healthy_primary`] names a primary, and returns it.
    pub async fn wait_healthy(&self, timeout: Duration) -> Result<String> {
        wait::until(
            "a healthy cluster (one primary, all replicas streaming)",
            timeout,
            || self.healthy_primary(),
        )
        .await
        .map_err(|error| {
            anyhow!(
                "{error:#}; see the agent logs in {}/nodes/*/agent.log",
                self.desc.dir.display()
            )
        })
    }

    /// The superuser's password.
    pub fn superuser_password(&self) -> Result<String> {
        read_secret(&self.desc.postgres.superuser_password_file)
    }

    /// Connects as the superuser to `address` (`HOST:PORT`).
    pub async fn connect_superuser(
        &self,
        address: &str,
        database: &str,
    ) -> Result<tokio_postgres::Client> {
        let password = self.superuser_password()?;
        connect(address, &self.desc.postgres.superuser, &password, database).await
    }

    /// Connects as the application role to `address`.
    pub async fn connect_app(&self, address: &str) -> Result<tokio_postgres::Client> {
        let access = &self.desc.postgres;
        let password = access.password()?;
        connect(address, &access.user, &password, &access.database).await
    }

    async fn create_app_database(&self) -> Result<()> {
        let client = self
            .connect_superuser(&self.desc.haproxy.write, "postgres")
            .await?;
        let access = &self.desc.postgres;
        let role_exists = client
            .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&access.user])
            .await?
            .is_some();
        if !role_exists {
            client
                .batch_execute(&format!(
                    "CREATE ROLE {} LOGIN PASSWORD '{}'",
                    access.user,
                    access.password()?.replace('\'', "''")
                ))
                .await?;
        }
        let database_exists = client
            .query_opt(
                "SELECT 1 FROM pg_database WHERE datname = $1",
                &[&access.database],
            )
            .await?
            .is_some();
        if !database_exists {
            client
                .batch_execute(&format!(
                    "CREATE DATABASE {} OWNER {}",
                    access.database, access.user
                ))
                .await?;
        }
        Ok(())
    }

    /// A client for the lab's etcd.
    pub async fn etcd(&self) -> Result<etcd_client::Client> {
        let options =
            etcd_client::ConnectOptions::new().with_connect_timeout(Duration::from_secs(2));
        Ok(etcd_client::Client::connect(&self.desc.etcd, Some(options)).await?)
    }

    /// The value of `/jai/<cluster>/<key>` in etcd.
    pub async fn etcd_value(&self, key: &str) -> Result<Option<String>> {
        let mut client = self.etcd().await?;
        let full = format!(
            "{}{key}",
            jai_proto::ClusterKeys::new(&self.desc.cluster).prefix()
        );
        let response =
            tokio::time::timeout(Duration::from_secs(3), client.get(full, None)).await??;
        Ok(response
            .kvs()
            .first()
            .map(|kv| kv.value_str().unwrap_or_default().to_owned()))
    }

    /// How to use the lab, for people: printed by `jai-lab up`. Writes
    /// `DIR/pgpass` so that no password needs to appear on a command line.
    pub fn instructions(&self) -> Result<String> {
        let access = &self.desc.postgres;
        let pgpass = self.desc.dir.join("pgpass");
        write_secret(
            &pgpass,
            &format!(
                "*:*:{}:{}:{}",
                access.database,
                access.user,
                access.password()?.replace(':', "\\:")
            ),
        )?;
        let (write_host, write_port) = self.desc.haproxy.write.rsplit_once(':').unwrap_or_default();
        let (_, read_port) = self.desc.haproxy.read.rsplit_once(':').unwrap_or_default();
        let dir = self.desc.dir.display();
        let exe = std::env::current_exe()?;
        let lab = exe.display();
        let jaictl = exe.with_file_name("jaictl");
        let jaictl = jaictl.display();
        let primary_api = &self.desc.nodes[0].api;
        Ok(format!(
            "\nThe cluster is up. Try:\n\
             \x20 writes (HAProxy -> primary):  PGPASSFILE={dir}/pgpass psql -h {write_host} -p {write_port} -U {user} {db}\n\
             \x20 reads  (HAProxy -> replicas): PGPASSFILE={dir}/pgpass psql -h {write_host} -p {read_port} -U {user} {db}\n\
             \x20 cluster state:                {jaictl} -c {dir}/jaictl.yaml status\n\
             \x20 planned switchover:           {jaictl} -c {dir}/jaictl.yaml switchover --force\n\
             \x20 backups (docs/backups.md):    {jaictl} -c {dir}/jaictl.yaml backup list  (also: backup create --type full, backup verify)\n\
             \x20 back to a point in time:      {jaictl} -c {dir}/jaictl.yaml restore --time -2m\n\
             \x20 one agent's view:             curl -s {primary_api}/status\n\
             \x20 health checks HAProxy uses:   curl -si {primary_api}/primary ; curl -si {primary_api}/replica\n\
             \x20 fail a node, revive it:       {lab} stop-node pg1 --dir {dir} --signal KILL ; {lab} start-node pg1 --dir {dir}\n\
             \x20 HAProxy's view:               echo 'show servers state' | socat - {socket}   (if socat is installed)\n\
             \x20 logs:                         {dir}/nodes/*/agent.log, {dir}/nodes/*/state/postgresql.log\n\
             \x20 stop everything:              make demo-down   (or {lab} down --dir {dir})\n\
             lab description for scripts: {dir}/lab.json\n",
            user = access.user,
            db = access.database,
            socket = self.desc.haproxy.stats_socket.display(),
        ) + &self.app_instructions()?)
    }

    /// The voting app's lines of the instructions, with the admin credential.
    fn app_instructions(&self) -> Result<String> {
        let Some(app) = &self.desc.app else {
            return Ok(String::new());
        };
        Ok(format!(
            "\nThe voting app (jai-app x{count} behind HAProxy):\n\
             \x20 site:   {url}\n\
             \x20 admin:  {admin}   user {user}, password in {file} (0600)\n\
             \x20 metrics: curl -H \"Authorization: Bearer $(cat {token})\" {admin}/metrics\n\
             \x20 logs:   {dir}/app/*/app.log\n",
            count = app.instances.len(),
            url = app.url,
            admin = app.admin_url,
            user = app.admin_user,
            file = app.admin_password_file.display(),
            token = app.metrics_token_file.display(),
            dir = self.desc.dir.display(),
        ))
    }

    /// Starts the app instances (after the application database exists).
    fn start_app(&mut self, spec: &AppSpec, bin_dir: Option<&Path>) -> Result<()> {
        let binary = crate::lab_app::find_binary(bin_dir)?;
        let access = &self.desc.postgres;
        let password = access.password()?;
        let db = crate::lab_app::Database {
            write: &self.desc.haproxy.write,
            read: &self.desc.haproxy.read,
            user: &access.user,
            password: &password,
            database: &access.database,
        };
        let mut app = self.desc.app.clone().expect("planned with the spec");
        let started = crate::lab_app::start(&self.desc.dir, &mut app, spec, &binary, &db);
        self.desc.app = Some(app);
        self.save()?;
        started
    }

    /// The `jaictl` binary built with this lab's agent (they sit side by side).
    pub fn jaictl_binary(&self) -> Result<PathBuf> {
        let agent = std::fs::read_to_string(self.desc.dir.join("agent-binary"))
            .context("reading agent-binary in the lab directory")?;
        let jaictl = Path::new(agent.trim()).with_file_name("jaictl");
        anyhow::ensure!(
            jaictl.is_file(),
            "{} not found: run `cargo build --workspace` first",
            jaictl.display()
        );
        Ok(jaictl)
    }

    /// A `jaictl -c DIR/jaictl.yaml ARGS…` command for this lab.
    pub fn jaictl(&self, args: &[&str]) -> Result<std::process::Command> {
        let mut command = std::process::Command::new(self.jaictl_binary()?);
        command
            .arg("-c")
            .arg(&self.desc.jaictl_config)
            .args(args)
            .stdin(std::process::Stdio::null());
        Ok(command)
    }

    /// The leader key: the leader's name and its term (the key's create revision).
    pub async fn leader_key(&self) -> Result<Option<(String, i64)>> {
        let mut client = self.etcd().await?;
        let key = jai_proto::ClusterKeys::new(&self.desc.cluster).leader();
        let response =
            tokio::time::timeout(Duration::from_secs(3), client.get(key, None)).await??;
        Ok(response.kvs().first().map(|kv| {
            (
                kv.value_str().unwrap_or_default().to_owned(),
                kv.create_revision(),
            )
        }))
    }

    /// The running nodes whose `/primary` answers 200 now.
    pub async fn primaries(&self) -> Vec<String> {
        let mut names = Vec::new();
        for node in self.running_nodes() {
            if self.api_code(node, "/primary").await.ok() == Some(200) {
                names.push(node.name.clone());
            }
        }
        names
    }

    /// A table of the nodes for `jai-lab status`.
    pub async fn status_table(&self) -> String {
        let mut text = format!(
            "cluster {}   write {}   read {}   etcd {}\n",
            self.desc.cluster,
            self.desc.haproxy.write,
            self.desc.haproxy.read,
            self.desc.etcd.join(",")
        );
        let _ = writeln!(
            text,
            "{:<6} {:<22} {:<8} {:<8} {:<9} {:>3} {:<12} {:>10}  NOTE",
            "NODE", "POSTGRES", "AGENT", "ROLE", "STATE", "TL", "LSN", "LAG"
        );
        for node in &self.desc.nodes {
            let agent = match node.agent_pid {
                Some(pid) if node.frozen => format!("{pid}(frz)"),
                Some(pid) if is_alive(pid) => pid.to_string(),
                _ => "stopped".into(),
            };
            let status = self.api_status(node).await.ok();
            let field = |name: &str| {
                status
                    .as_ref()
                    .and_then(|status| status.get(name))
                    .filter(|value| !value.is_null())
                    .map(|value| {
                        value
                            .as_str()
                            .map(str::to_owned)
                            .unwrap_or_else(|| value.to_string())
                    })
                    .unwrap_or_else(|| "-".into())
            };
            let lsn = match field("write_lsn").as_str() {
                "-" => field("replay_lsn"),
                lsn => lsn.to_owned(),
            };
            let role = if field("accepts_writes") == "true" {
                "leader".to_owned()
            } else {
                field("role")
            };
            let _ = writeln!(
                text,
                "{:<6} {:<22} {:<8} {:<8} {:<9} {:>3} {:<12} {:>10}  {}",
                node.name,
                node.pg,
                agent,
                role,
                field("state"),
                field("timeline"),
                lsn,
                field("lag_bytes"),
                match status {
                    None => "API unreachable".to_owned(),
                    Some(_) if field("reason") == "-" => String::new(),
                    Some(_) => field("reason"),
                }
            );
        }
        text
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.owned {
            self.kill_everything();
            let _ = self.save();
        }
    }
}

/// Connects to PostgreSQL at `address` with a short timeout.
pub async fn connect(
    address: &str,
    user: &str,
    password: &str,
    database: &str,
) -> Result<tokio_postgres::Client> {
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| anyhow!("{address:?} is not HOST:PORT"))?;
    let mut config = tokio_postgres::Config::new();
    config
        .host(host)
        .port(port.parse()?)
        .user(user)
        .password(password)
        .dbname(database)
        .connect_timeout(Duration::from_secs(2));
    let (client, connection) = tokio::time::timeout(
        Duration::from_secs(3),
        config.connect(tokio_postgres::NoTls),
    )
    .await
    .map_err(|_| anyhow!("connecting to {address} timed out"))?
    .with_context(|| format!("connecting to {address}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Runs `iptables -w ARGS`, failing with its message.
pub(crate) fn iptables(args: &[&str]) -> Result<()> {
    run_tool("iptables", &[&["-w"][..], args].concat())
}

/// Runs `PROGRAM ARGS`, failing with its error output.
pub(crate) fn run_tool(program: &str, args: &[&str]) -> Result<()> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    anyhow::ensure!(
        output.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("a plain HTTP client always builds")
}

fn absolute(dir: &Path) -> Result<PathBuf> {
    Ok(if dir.is_absolute() {
        dir.to_owned()
    } else {
        std::env::current_dir()?.join(dir)
    })
}

/// PostgreSQL runs as `postgres`, which must be able to reach the lab directory.
fn check_reachable_by_others(dir: &Path) -> Result<()> {
    for ancestor in dir.ancestors().skip(1) {
        let Ok(metadata) = std::fs::metadata(ancestor) else {
            continue;
        };
        if metadata.permissions().mode() & 0o001 == 0 {
            bail!(
                "--dir {}: the postgres user cannot enter {} (mode {:o}); pick a directory under /tmp or run `chmod o+x {}`",
                dir.display(),
                ancestor.display(),
                metadata.permissions().mode() & 0o777,
                ancestor.display()
            );
        }
    }
    Ok(())
}

/// A random `127.X.Y.1`, so that labs never share ports.
fn pick_loopback_host() -> Result<Ipv4Addr> {
    for _ in 0..20 {
        let host = Ipv4Addr::new(127, rand::random_range(1..=254), rand::random(), 1);
        if TcpListener::bind((host, 0)).is_ok() {
            return Ok(host);
        }
    }
    bail!("cannot bind to any 127.X.Y.1 address: is the loopback interface up?")
}

/// `count` distinct free ports on `host`, held open together while picked.
fn free_ports(host: Ipv4Addr, count: usize) -> Result<Vec<u16>> {
    let listeners = (0..count)
        .map(|_| TcpListener::bind((host, 0)))
        .collect::<std::io::Result<Vec<_>>>()
        .context("picking free ports")?;
    listeners
        .iter()
        .map(|listener| Ok(listener.local_addr()?.port()))
        .collect()
}

pub(crate) fn random_password() -> String {
    use rand::distr::{Alphanumeric, SampleString};
    Alphanumeric.sample_string(&mut rand::rng(), 24)
}

/// A secret [`write_secret`] wrote, without its trailing newline.
pub(crate) fn read_secret(file: &Path) -> Result<String> {
    Ok(std::fs::read_to_string(file)
        .with_context(|| format!("reading {}", file.display()))?
        .trim()
        .to_owned())
}

pub(crate) fn write_secret(file: &Path, secret: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut handle = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(file)
        .with_context(|| format!("writing {}", file.display()))?;
    writeln!(handle, "{secret}")?;
    Ok(())
}

fn find_agent_binary(bin_dir: Option<&Path>) -> Result<PathBuf> {
    find_binary("jai-agent", bin_dir)
}

/// Finds binary `name`: `--bin-dir`, then beside this executable, then one level up
/// (integration tests run from `target/debug/deps`).
pub(crate) fn find_binary(name: &str, bin_dir: Option<&Path>) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(dir) = bin_dir {
        candidates.push(dir.join(name));
    }
    if let Some(dir) = exe.parent() {
        candidates.push(dir.join(name));
        if let Some(parent) = dir.parent() {
            candidates.push(parent.join(name));
        }
    }
    candidates
        .iter()
        .find(|candidate| candidate.is_file())
        .cloned()
        .ok_or_else(|| anyhow!("{name} binary not found (looked in {candidates:?}); run `cargo build --workspace` first"))
}

fn agent_yaml(
    desc: &LabDescription,
    node: &NodeInfo,
    run_as: Option<&str>,
    superuser_file: &Path,
    replication_file: &Path,
    spec: &LabSpec,
) -> String {
    let tags = spec.tags.get(&node.name);
    let dcs = spec.bootstrap_dcs(&desc.dir.join("backup/repo"));
    let dcs = dcs.as_ref();
    let api_listen = node.api.trim_start_matches("http://");
    let mut yaml = format!(
        "# Written by jai-lab.\n\
         name: {name}\n\
         cluster: {cluster}\n\
         state_dir: {state}\n\
         etcd:\n  endpoints: [{endpoints}]\n\
         api:\n  listen: {api_listen}\n\
         postgresql:\n  data_dir: {data}\n  listen: {pg}\n",
        name = node.name,
        cluster = desc.cluster,
        state = node.state_dir().display(),
        endpoints = node.etcd.join(", "),
        data = node.data_dir.display(),
        pg = node.pg,
    );
    if let Some(user) = run_as {
        let _ = writeln!(yaml, "  run_as: {user}");
    }
    if spec.reclone_on_rewind_failure {
        let _ = writeln!(yaml, "  reclone_on_rewind_failure: true");
    }
    let _ = write!(
        yaml,
        "  superuser:\n    username: {SUPERUSER}\n    password_file: {}\n\
         \x20 replication:\n    username: {REPLICATION_USER}\n    password_file: {}\n",
        superuser_file.display(),
        replication_file.display()
    );
    let _ = writeln!(
        yaml,
        "grpc:\n  listen: {}\n  token_file: {}",
        node.grpc.trim_start_matches("http://"),
        desc.control_token_file.display()
    );
    yaml.push_str(&agent_haproxy_section(&desc.haproxy));
    let _ = writeln!(yaml, "log:\n  format: {}", spec.agent_log_format.name());
    if let Some(tags) = tags {
        let _ = writeln!(
            yaml,
            "tags: {}",
            serde_json::to_string(tags).expect("tags serialise")
        );
    }
    if let Some(dcs) = dcs {
        let _ = writeln!(
            yaml,
            "bootstrap:\n  dcs: {}",
            serde_json::to_string(dcs).expect("config serialises")
        );
    }
    yaml
}

/// `DIR/jaictl.yaml`: the lab's cluster, its etcd and its control token.
fn jaictl_yaml(desc: &LabDescription) -> String {
    format!(
        "# Written by jai-lab: jaictl -c {config} status\n\
         cluster: {cluster}\n\
         etcd:\n  endpoints: [{endpoints}]\n\
         token_file: {token}\n",
        config = desc.jaictl_config.display(),
        cluster = desc.cluster,
        endpoints = desc.etcd.join(", "),
        token = desc.control_token_file.display(),
    )
}

/// The `haproxy` section of an agent's config: the lab's HAProxy, any extra
/// sockets, and the servers' check interval (for servers added at runtime).
fn agent_haproxy_section(haproxy: &HaproxyInfo) -> String {
    let sockets: Vec<String> = std::iter::once(haproxy.stats_socket.display().to_string())
        .chain(haproxy.extra_sockets.iter().cloned())
        .map(|socket| format!("{socket:?}"))
        .collect();
    let mut section = format!("haproxy:\n  sockets: [{}]\n", sockets.join(", "));
    if haproxy.check_interval_ms > 0 {
        let _ = writeln!(section, "  check_interval: {}ms", haproxy.check_interval_ms);
    }
    section
}

/// `DIR/haproxy/haproxy.cfg`: the database listeners as `jaictl
/// haproxy-config` renders them, then the app's HTTP frontend, if any.
fn haproxy_cfg(desc: &LabDescription, check_interval: Duration) -> Result<String> {
    let members = desc
        .nodes
        .iter()
        .map(|node| {
            jai_proto::BalancedMember::from_urls(&node.name, &node.pg, &node.api)
                .ok_or_else(|| anyhow!("node {}: no host:port in {}", node.name, node.api))
        })
        .collect::<Result<Vec<_>>>()?;
    let options = jai_proto::HaproxyCfgOptions {
        write_bind: desc.haproxy.write.clone(),
        read_bind: desc.haproxy.read.clone(),
        stats_socket: desc.haproxy.stats_socket.display().to_string(),
        check_interval,
        ..Default::default()
    };
    let mut cfg = jai_proto::render_haproxy_cfg(&members, &options);
    if let Some(app) = &desc.app {
        cfg.push('\n');
        cfg.push_str(&crate::lab_app::haproxy_section(app, check_interval));
    }
    Ok(cfg)
}
