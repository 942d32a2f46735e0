//! Pushes role changes to HAProxy's runtime API, so routing follows a
//! promotion at once instead of at the next health check (docs/architecture.md,
//! "Routing").
//!
//! Health checks stay the safety net. A push only changes a server's *health*
//! (operational state), never its admin state: the next check still decides,
//! in both directions, and an operator's `maint` is left alone. Only the leader
//! forces a server up, and only where the check would agree: itself in the
//! write backend right after it promoted holding the key and a confirmed lease
//! (what `/primary` checks), and in the read backend the replicas that pass
//! `/replica?lag=<max_read_lag>` by etcd's account (see [`Routing::new`]).
//! Everything else is forced down.
//!
//! Each HAProxy has its own connection per push, all in parallel, each bounded
//! by [`PUSH_TIMEOUT`]: one being down delays nothing. An outage is logged once,
//! when it starts, and once when the HAProxy answers again.

use crate::config::HaproxyConfig;
use anyhow::{anyhow, Context, Result};
use jai_proto::haproxy_cfg::{server_options, BalancedMember};
use jai_proto::{Lsn, MemberRole, MemberState, MemberStatus};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long one HAProxy may take to take a push: one being down delays nothing.
const PUSH_TIMEOUT: Duration = Duration::from_millis(500);

/// How often the leader re-sends its routing to HAProxys that answer; one
/// that does not is retried every decision round until it does.
pub const RECONCILE_EVERY: Duration = Duration::from_secs(5);

/// What every HAProxy should route, as the leader sees the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routing {
    /// The only server up in the write backend: the leader itself.
    pub leader: String,
    /// Servers up in the read backend.
    pub readable: Vec<String>,
    /// Every registered member, to add to a backend that lacks it.
    pub members: Vec<BalancedMember>,
}

impl Routing {
    /// The leader's routing: itself for writes; for reads, the running
    /// replicas that are not tagged `noloadbalance`, do not say they fail to
    /// stream, and are at most `max_lag` bytes behind `leader_position` (the
    /// `status` key's position, as each replica's `/replica?lag=` counts it).
    /// A replica whose lag is unknown is out, as `/replica?lag=` says.
    pub fn new(
        leader: &str,
        members: &[MemberStatus],
        leader_position: Option<Lsn>,
        max_lag: u64,
    ) -> Self {
        let readable = members
            .iter()
            .filter(|member| {
                member.name != leader
                    && member.role == MemberRole::Replica
                    && member.state == MemberState::Running
                    && !member.tags.noloadbalance
                    && member.streaming != Some(false)
                    && leader_position
                        .zip(member.wal_position())
                        .is_some_and(|(ahead, position)| ahead.bytes_since(position) <= max_lag)
            })
            .map(|member| member.name.clone())
            .collect();
        let members = members
            .iter()
            .filter_map(|member| {
                BalancedMember::from_urls(&member.name, &member.pg_address, &member.api_url)
            })
            .collect();
        Self {
            leader: leader.to_owned(),
            readable,
            members,
        }
    }
}

/// One server as `show servers state` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ServerState {
    backend: String,
    name: String,
    /// `srv_op_state` is not 0 (stopped): it may take traffic.
    up: bool,
}

/// Servers from `show servers state` (version 1: backend name, server name
/// and operational state are the 2nd, 4th and 6th columns).
fn parse_servers_state(state: &str) -> Vec<ServerState> {
    state
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.len() >= 6).then(|| ServerState {
                backend: fields[1].to_owned(),
                name: fields[3].to_owned(),
                up: fields[5] != "0",
            })
        })
        .collect()
}

/// The commands that add `member` to `backend` at runtime (HAProxy ≥ 2.4). A
/// dynamic server starts in maintenance with its checks off and takes nothing
/// from `default-server`; it comes out of maintenance *up*, so it is added
/// with weight 0 (no traffic), forced down, and only then given its weight.
/// The caller forces it up afterwards if it should be.
fn add_server(backend: &str, member: &BalancedMember, check_interval: Duration) -> Vec<String> {
    let server = format!("{backend}/{}", member.name);
    vec![
        format!(
            "add server {server} {} weight 0 {}",
            member.pg_address,
            server_options(member, check_interval)
        ),
        format!("enable health {server}"),
        format!("enable server {server}"),
        format!("set server {server} health down"),
        format!("set weight {server} 1"),
    ]
}

/// The commands that bring one HAProxy, whose servers are `current`, to `routing`.
fn reconcile_commands(
    config: &HaproxyConfig,
    routing: &Routing,
    current: &[ServerState],
) -> Vec<String> {
    let mut commands = Vec::new();
    let mut backends = vec![(config.write_backend.as_str(), true)];
    if let Some(read) = &config.read_backend {
        backends.push((read.as_str(), false));
    }
    for (backend, writes) in backends {
        let servers: Vec<&ServerState> = current
            .iter()
            .filter(|server| server.backend == backend)
            .collect();
        for member in &routing.members {
            if !servers.iter().any(|server| server.name == member.name) {
                commands.extend(add_server(backend, member, config.check_interval));
            }
        }
        let mut names: Vec<(&str, bool)> = servers
            .iter()
            .map(|server| (server.name.as_str(), server.up))
            .collect();
        for member in &routing.members {
            if !names.iter().any(|(name, _)| *name == member.name) {
                names.push((&member.name, false));
            }
        }
        for (name, up) in names {
            let ready = if writes {
                name == routing.leader
            } else {
                routing.readable.iter().any(|readable| readable == name)
            };
            if ready {
                commands.push(format!("set server {backend}/{name} health up"));
            } else {
                commands.push(format!("set server {backend}/{name} health down"));
                // The write backend cuts every time: a session to a former
                // primary must never survive. Reads only when leaving.
                if writes || up {
                    commands.push(format!("shutdown sessions server {backend}/{name}"));
                }
            }
        }
    }
    commands
}

/// The commands that take `member` out of `backend` and cut its sessions there.
pub fn stop_writes_to(backend: &str, member: &str) -> String {
    format!(
        "set server {backend}/{member} health down; shutdown sessions server {backend}/{member}"
    )
}

/// One HAProxy: its socket, and whether it is in an outage.
#[derive(Debug)]
struct Balancer {
    socket: String,
    /// Held for each exchange, so pushes to one HAProxy never overtake each
    /// other; `Some(error)` while it does not answer.
    outage: tokio::sync::Mutex<Option<String>>,
}

/// Every configured HAProxy, and when the leader last reconciled them.
#[derive(Debug)]
pub struct Balancers {
    config: HaproxyConfig,
    balancers: Vec<Arc<Balancer>>,
    last_reconcile: std::sync::Mutex<Option<Instant>>,
    /// A background reconciliation is running.
    reconciling: Arc<std::sync::atomic::AtomicBool>,
    /// Bumped by every [`Self::push`] (a step down): a reconciliation started
    /// before it must not land after it, with this member still forced up.
    epoch: Arc<std::sync::atomic::AtomicU64>,
}

impl Balancers {
    /// The HAProxys of `config`.
    pub fn new(config: HaproxyConfig) -> Arc<Self> {
        let balancers = config
            .sockets
            .iter()
            .map(|socket| {
                Arc::new(Balancer {
                    socket: socket.clone(),
                    outage: tokio::sync::Mutex::new(None),
                })
            })
            .collect();
        Arc::new(Self {
            config,
            balancers,
            last_reconcile: std::sync::Mutex::new(None),
            reconciling: Default::default(),
            epoch: Default::default(),
        })
    }

    /// The config they were made from.
    pub fn config(&self) -> &HaproxyConfig {
        &self.config
    }

    /// The commands `build` makes for the write backend, then the read one.
    pub fn for_each_backend(&self, build: impl Fn(&str) -> String) -> String {
        std::iter::once(&self.config.write_backend)
            .chain(self.config.read_backend.as_ref())
            .map(|backend| build(backend))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// The read-lag bound, in bytes (validated at start-up).
    pub fn max_read_lag(&self) -> u64 {
        self.config.max_read_lag.bytes().unwrap_or(1 << 20)
    }

    /// A reconciliation is due: never done, `RECONCILE_EVERY` passed, or an
    /// HAProxy in an outage (retried every round, reconciled once it answers).
    pub fn reconcile_due(&self) -> bool {
        let last = *self.last_reconcile.lock().expect("not poisoned");
        let in_outage = self.balancers.iter().any(|balancer| {
            balancer
                .outage
                .try_lock()
                .map_or(true, |outage| outage.is_some())
        });
        last.is_none_or(|at| at.elapsed() >= RECONCILE_EVERY) || in_outage
    }

    /// Brings every HAProxy to `routing`, all at once; returns when each has
    /// answered or timed out.
    pub async fn reconcile(&self, routing: &Routing) {
        self.reconcile_since(routing, self.epoch.load(Ordering::SeqCst))
            .await;
    }

    /// [`Self::reconcile`], skipping each HAProxy a step down (a `push`) has
    /// reached since `epoch`.
    async fn reconcile_since(&self, routing: &Routing, epoch: u64) {
        *self.last_reconcile.lock().expect("not poisoned") = Some(Instant::now());
        let mut sends = tokio::task::JoinSet::new();
        for balancer in &self.balancers {
            let (balancer, config, routing) =
                (balancer.clone(), self.config.clone(), routing.clone());
            let current_epoch = self.epoch.clone();
            sends.spawn(async move {
                balancer
                    .exchange_logged(3 * PUSH_TIMEOUT, |socket| async move {
                        if current_epoch.load(Ordering::SeqCst) != epoch {
                            return Ok(());
                        }
                        let state = exchange_with(&socket, "show servers state").await?;
                        let commands =
                            reconcile_commands(&config, &routing, &parse_servers_state(&state));
                        send(&socket, &commands.join("; ")).await
                    })
                    .await
            });
        }
        sends.join_all().await;
    }

    /// Takes every server of the write backend but `me` down and cuts its
    /// sessions, on every HAProxy at once, without putting `me` up: what a
    /// new leader does right before it promotes. The servers come from each
    /// HAProxy's own state, so a former primary whose member key expired
    /// (a hung agent) is cut too.
    pub async fn cut_writes_except(&self, me: &str) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        let mut sends = tokio::task::JoinSet::new();
        for balancer in &self.balancers {
            let (balancer, backend, me) = (
                balancer.clone(),
                self.config.write_backend.clone(),
                me.to_owned(),
            );
            sends.spawn(async move {
                balancer
                    .exchange_logged(3 * PUSH_TIMEOUT, |socket| async move {
                        let state = exchange_with(&socket, "show servers state").await?;
                        let commands: Vec<String> = parse_servers_state(&state)
                            .iter()
                            .filter(|server| server.backend == backend && server.name != me)
                            .map(|server| stop_writes_to(&backend, &server.name))
                            .collect();
                        if commands.is_empty() {
                            return Ok(());
                        }
                        send(&socket, &commands.join("; ")).await
                    })
                    .await
            });
        }
        sends.join_all().await;
    }

    /// [`Self::reconcile`] in the background, unless one is still running: the
    /// decision loop never waits for a slow HAProxy.
    pub fn reconcile_in_background(self: &Arc<Self>, routing: Routing) {
        if self.reconciling.swap(true, Ordering::SeqCst) {
            return;
        }
        let balancers = self.clone();
        let epoch = self.epoch.load(Ordering::SeqCst);
        tokio::spawn(async move {
            balancers.reconcile_since(&routing, epoch).await;
            balancers.reconciling.store(false, Ordering::SeqCst);
        });
    }

    /// Sends `commands` (a step down: [`stop_writes_to`]) to every HAProxy
    /// at once, each bounded by a timeout, after any reconciliation in flight
    /// to the same HAProxy; one started earlier and still queued is dropped.
    pub async fn push(&self, commands: &str) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        let mut sends = tokio::task::JoinSet::new();
        for balancer in &self.balancers {
            let (balancer, commands) = (balancer.clone(), commands.to_owned());
            sends.spawn(async move {
                balancer
                    .exchange_logged(3 * PUSH_TIMEOUT, |socket| async move {
                        send(&socket, &commands).await
                    })
                    .await
            });
        }
        sends.join_all().await;
    }
}

impl Balancer {
    /// Runs `exchange` on this HAProxy, after any exchange still under way
    /// (all within `limit`), and logs an outage when it starts and ends.
    async fn exchange_logged<F, Fut>(&self, limit: Duration, exchange: F)
    where
        F: FnOnce(String) -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        let socket = self.socket.clone();
        let outcome = tokio::time::timeout(limit, async {
            let mut outage = self.outage.lock().await;
            let result = tokio::time::timeout(PUSH_TIMEOUT * 2, exchange(socket.clone()))
                .await
                .unwrap_or_else(|_| Err(anyhow!("no answer within {:?}", PUSH_TIMEOUT * 2)));
            note_outcome(&socket, &mut outage, result);
        })
        .await;
        if outcome.is_err() {
            // The lock was held by an exchange that itself timed out: that one logs.
            tracing::debug!(
                socket,
                "HAProxy push skipped: the previous one is still running"
            );
        }
    }
}

/// Logs the start and the end of an outage, never each failed push.
fn note_outcome(socket: &str, outage: &mut Option<String>, result: Result<()>) {
    match (result, outage.is_some()) {
        (Ok(()), true) => {
            tracing::info!(socket, "HAProxy push: {socket} answers again, reconciled");
            *outage = None;
        }
        (Ok(()), false) => {}
        (Err(error), false) => {
            tracing::warn!(
                socket,
                "HAProxy push failed: {socket}: {error:#} (retried every round; logged once per outage)"
            );
            *outage = Some(format!("{error:#}"));
        }
        (Err(error), true) => tracing::debug!(socket, "HAProxy push failed again: {error:#}"),
    }
}

/// What HAProxy says when a command worked but it still wants to say so.
const SUCCESS_ANSWERS: &[&str] = &["New server registered."];

async fn send(socket: &str, commands: &str) -> Result<()> {
    let answer = exchange_with(socket, commands).await?;
    // Success is silent; HAProxy answers errors in words ("No such server." …).
    let complaints: Vec<&str> = answer
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !SUCCESS_ANSWERS.contains(line))
        .collect();
    if complaints.is_empty() {
        Ok(())
    } else {
        Err(anyhow!("{}", complaints.join(" ")))
    }
}

/// Sends `commands` on a new connection to `socket` and returns the answer.
async fn exchange_with(socket: &str, commands: &str) -> Result<String> {
    let answer = if socket.starts_with('/') {
        let mut stream = tokio::net::UnixStream::connect(socket)
            .await
            .context("connecting")?;
        exchange(&mut stream, commands).await?
    } else {
        let mut stream = tokio::net::TcpStream::connect(socket)
            .await
            .context("connecting")?;
        exchange(&mut stream, commands).await?
    };
    Ok(answer)
}

async fn exchange<S: AsyncReadExt + AsyncWriteExt + Unpin>(
    stream: &mut S,
    commands: &str,
) -> Result<String> {
    stream.write_all(format!("{commands}\n").as_bytes()).await?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await?;
    Ok(answer)
}

/// Per-socket outage state for tests: which sockets are in an outage.
#[cfg(test)]
fn outages(balancers: &Balancers) -> std::collections::HashMap<String, bool> {
    balancers
        .balancers
        .iter()
        .map(|balancer| {
            let down = balancer
                .outage
                .try_lock()
                .map(|outage| outage.is_some())
                .unwrap_or(false);
            (balancer.socket.clone(), down)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> HaproxyConfig {
        serde_saphyr::from_str("sockets: [/run/haproxy/admin.sock]").unwrap()
    }

    fn member(name: &str, role: MemberRole, lsn: &str) -> MemberStatus {
        let lsn: Lsn = lsn.parse().unwrap();
        MemberStatus {
            name: name.into(),
            role,
            state: MemberState::Running,
            reason: None,
            api_url: format!("http://127.0.0.1:80{}", &name[2..]),
            pg_address: format!("127.0.0.1:54{}", &name[2..]),
            pg_paths: None,
            grpc_url: None,
            system_id: None,
            timeline: Some(1),
            write_lsn: (role == MemberRole::Primary).then_some(lsn),
            receive_lsn: (role == MemberRole::Replica).then_some(lsn),
            replay_lsn: (role == MemberRole::Replica).then_some(lsn),
            tags: Default::default(),
            standing_down: false,
            streaming: None,
            standbys: Vec::new(),
            version: "test".into(),
        }
    }

    #[test]
    fn reads_go_to_streaming_replicas_within_the_bound() {
        let mut quiet = member("pg4", MemberRole::Replica, "0/3000000");
        quiet.tags.noloadbalance = true;
        let mut stopped = member("pg5", MemberRole::Replica, "0/3000000");
        stopped.state = MemberState::Stopped;
        let mut cut_off = member("pg6", MemberRole::Replica, "0/3000000");
        cut_off.streaming = Some(false);
        let mut streams = member("pg2", MemberRole::Replica, "0/2F00000");
        streams.streaming = Some(true);
        let members = vec![
            member("pg1", MemberRole::Primary, "0/3000000"),
            streams,
            member("pg3", MemberRole::Replica, "0/1000000"),
            quiet,
            stopped,
            cut_off,
        ];
        let routing = Routing::new("pg1", &members, Some("0/3000000".parse().unwrap()), 1 << 20);
        assert_eq!(routing.readable, vec!["pg2".to_owned()]);
        assert_eq!(routing.members.len(), 6);
        assert_eq!(routing.members[1].api_address, "127.0.0.1:802");
        // Unknown lag: out, as /replica?lag= says.
        let routing = Routing::new("pg1", &members, None, 1 << 20);
        assert!(routing.readable.is_empty());
    }

    #[test]
    fn servers_come_from_the_state_dump() {
        let state = "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state\n\
                     2 jai_write 1 pg1 127.0.0.1 2 0\n3 jai_read 2 pg2 127.0.0.1 0 0\n";
        assert_eq!(
            parse_servers_state(state),
            vec![
                ServerState {
                    backend: "jai_write".into(),
                    name: "pg1".into(),
                    up: true
                },
                ServerState {
                    backend: "jai_read".into(),
                    name: "pg2".into(),
                    up: false
                },
            ]
        );
    }

    #[test]
    fn only_the_leader_is_forced_up_for_writes_and_missing_members_are_added() {
        let members = vec![
            member("pg1", MemberRole::Replica, "0/3000000"),
            member("pg2", MemberRole::Primary, "0/3000000"),
            member("pg3", MemberRole::Replica, "0/3000000"),
        ];
        let routing = Routing::new("pg2", &members, Some("0/3000000".parse().unwrap()), 1 << 20);
        let current = parse_servers_state(
            "2 jai_write 1 pg1 x 2 0\n2 jai_write 2 pg2 x 0 0\n2 jai_write 3 old x 0 0\n\
             3 jai_read 1 pg1 x 2 0\n3 jai_read 2 pg2 x 2 0\n3 jai_read 3 pg3 x 0 0\n",
        );
        let commands = reconcile_commands(&config(), &routing, &current);
        let ups: Vec<&String> = commands
            .iter()
            .filter(|c| c.ends_with("health up"))
            .collect();
        assert_eq!(
            ups,
            [
                "set server jai_write/pg2 health up",
                "set server jai_read/pg1 health up",
                "set server jai_read/pg3 health up"
            ]
        );
        for cut in [
            "jai_write/pg1",
            "jai_write/pg3",
            "jai_write/old",
            "jai_read/pg2",
        ] {
            assert!(
                commands.contains(&format!("shutdown sessions server {cut}")),
                "{cut}"
            );
        }
        // pg3 is missing from the write backend: added with no weight, forced
        // down before it gets any, then kept down.
        let added: Vec<&String> = commands
            .iter()
            .filter(|c| c.contains("jai_write/pg3"))
            .collect();
        assert!(added[0].starts_with("add server jai_write/pg3 127.0.0.1:543 weight 0 check addr 127.0.0.1 port 803 inter 2000ms"));
        assert_eq!(
            added[1..],
            [
                "enable health jai_write/pg3",
                "enable server jai_write/pg3",
                "set server jai_write/pg3 health down",
                "set weight jai_write/pg3 1",
                "set server jai_write/pg3 health down",
                "shutdown sessions server jai_write/pg3"
            ]
        );
    }

    #[tokio::test]
    async fn an_unreachable_haproxy_is_an_outage_until_it_answers() {
        let config: HaproxyConfig =
            serde_saphyr::from_str("sockets: [/nonexistent/jai-test.sock]").unwrap();
        let balancers = Balancers::new(config);
        assert!(balancers.reconcile_due());
        balancers.push("show info").await;
        assert!(outages(&balancers)["/nonexistent/jai-test.sock"]);
        // Retried every round while the outage lasts.
        *balancers.last_reconcile.lock().unwrap() = Some(Instant::now());
        assert!(balancers.reconcile_due());
    }

    /// A stand-in HAProxy on a Unix socket: records each request line and
    /// answers `answer` to `show servers state`, nothing to anything else.
    fn fake_haproxy(
        dir: &tempfile::TempDir,
        answer: &'static str,
    ) -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
        use tokio::io::AsyncBufReadExt;
        let path = dir.path().join("admin.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let received = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = received.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let mut stream = tokio::io::BufReader::new(stream);
                let mut line = String::new();
                let _ = stream.read_line(&mut line).await;
                let line = line.trim().to_owned();
                let reply = if line == "show servers state" {
                    answer
                } else {
                    ""
                };
                let _ = stream.get_mut().write_all(reply.as_bytes()).await;
                log.lock().unwrap().push(line);
            }
        });
        (path.display().to_string(), received)
    }

    #[tokio::test]
    async fn a_reconcile_overtaken_by_a_step_down_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (socket, received) = fake_haproxy(&dir, "1\n2 jai_write 1 pg1 x 2 0\n");
        let mut config = config();
        config.sockets = vec![socket];
        config.read_backend = None;
        let balancers = Balancers::new(config);
        let members = vec![member("pg1", MemberRole::Primary, "0/3000000")];
        let routing = Routing::new("pg1", &members, None, 0);
        let before = balancers.epoch.load(Ordering::SeqCst);
        balancers.push(&stop_writes_to("jai_write", "pg1")).await;
        balancers.reconcile_since(&routing, before).await;
        assert_eq!(
            *received.lock().unwrap(),
            ["set server jai_write/pg1 health down; shutdown sessions server jai_write/pg1"]
        );
        // A reconcile from now on goes through.
        balancers.reconcile(&routing).await;
        let received = received.lock().unwrap();
        assert_eq!(
            received[1..],
            ["show servers state", "set server jai_write/pg1 health up"]
        );
        assert!(outages(&balancers).values().all(|down| !down));
    }
}
