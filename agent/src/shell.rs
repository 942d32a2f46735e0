//! The imperative shell: observe, ask the core, act, and wait for the next reason
//! to look again (an etcd watch event, PostgreSQL exiting, the lease lost, or
//! `loop_wait` passing).

use crate::api::{self, NodeSnapshot};
use crate::config::AgentConfig;
use crate::control::{self, OperatorRequest, OperatorRequestKind};
use crate::dcs::LeaseTracker;
use crate::dcs::{self, Dcs};
use crate::ha::{
    Action, ClusterView, Core, DataDir, Decision, Identity, LeaseView, LocalPostgres,
    MemberAddresses, Millis, Observation, PgProcess, PgRole, RewindOutcome, StartAs, SyncNames,
};
use crate::persisted::UnrewoundMarker;
use crate::postgres::Postgres;
use anyhow::{anyhow, Context, Result};
use jai_proto::{DynamicConfig, HistoryEntry, MemberRole, MemberState, MemberStatus};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;

/// The agent's monotonic clock, in milliseconds since it started.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start: Instant,
}

impl Clock {
    /// A clock starting now.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
        }
    }

    /// Now.
    pub fn now(&self) -> Millis {
        self.millis_at(Instant::now())
    }

    /// `instant` on this clock (0 for instants before the start).
    pub fn millis_at(&self, instant: Instant) -> Millis {
        instant.saturating_duration_since(self.start).as_millis() as Millis
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// Consecutive immediate re-checks allowed before the loop waits anyway, so a
/// rule that keeps asking for action cannot spin the CPU.
const MAX_IMMEDIATE_RECHECKS: u32 = 20;

/// Everything the loop owns.
struct Agent {
    config: AgentConfig,
    dcs: Dcs,
    pg: Postgres,
    core: Core,
    clock: Clock,
    /// The cluster config in force (etcd's once read, the bootstrap seed before).
    dynamic: DynamicConfig,
    /// The last cluster view read, to resolve member addresses for actions.
    view: Option<ClusterView>,
    /// The last reason logged, so a reason is logged once, when it changes.
    last_reason: Option<String>,
    /// The last error logged per kind of failure, so an outage is logged once.
    last_errors: std::collections::HashMap<String, String>,
    snapshot: watch::Sender<NodeSnapshot>,
    /// What the fencing watchdog guards: the postmaster, while it is a primary.
    fence: Arc<FenceTarget>,
    /// The outcome of the last `pg_rewind`, for the core.
    last_rewind: Option<RewindOutcome>,
    /// On disk: this member's data is a former primary not rewound yet.
    unrewound_marker: UnrewoundMarker,
    /// Asks peers for their WAL positions during an election.
    http: reqwest::Client,
    /// The HAProxys to push routing to, with their outage state.
    haproxy: Option<Arc<crate::haproxy::Balancers>>,
    /// The decision being carried out hands leadership over (a switchover):
    /// its stop must be clean however long the WAL senders take, and the
    /// final WAL position is published before the key goes.
    handing_over: bool,
    /// Operator requests from the control API, run between two decisions.
    operator_requests: mpsc::Receiver<OperatorRequest>,
}

/// The primary the fencing watchdog must stop if the lease runs out.
#[derive(Debug, Default)]
struct FenceTarget {
    /// PID of a postmaster running as primary; 0 when there is none.
    primary_pid: AtomicI32,
    /// Demotion margin in milliseconds.
    margin_ms: AtomicU64,
}

/// How long a peer's API may take to report its WAL position in an election.
const PEER_TIMEOUT: Duration = Duration::from_millis(300);

/// How often the watchdog compares the lease deadline with the clock.
const FENCE_CHECK_EVERY: Duration = Duration::from_millis(50);

/// Stops a primary whose lease is not confirmed beyond the demotion margin,
/// independently of the decision loop, which may be blocked on a slow etcd
/// request or a long action (DESIGN.md §3.1). A fast shutdown (SIGINT) ends
/// every session at once, so no write is acknowledged after it.
async fn run_fence_watchdog(
    lease: Arc<LeaseTracker>,
    target: Arc<FenceTarget>,
    wake: Arc<Notify>,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(FENCE_CHECK_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let pid = target.primary_pid.load(Ordering::SeqCst);
        let margin = Duration::from_millis(target.margin_ms.load(Ordering::SeqCst));
        if pid > 0 && !lease.is_valid_beyond(margin) {
            tracing::error!(
                pid,
                "fencing: leader lease not confirmed by etcd; stopping PostgreSQL before the lease can expire"
            );
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGINT,
            );
            target.primary_pid.store(0, Ordering::SeqCst);
            wake.notify_one();
        }
    }
}

/// Runs the agent until `stop` is cancelled, then shuts down gracefully.
pub async fn run(config: AgentConfig, stop: CancellationToken) -> Result<()> {
    let dynamic = config.bootstrap.dcs.clone();
    let wake = Arc::new(Notify::new());
    let dcs = Dcs::connect(
        &config.etcd.endpoints,
        &config.cluster,
        &config.name,
        dynamic.retry_timeout,
    )
    .await?;
    let mut pg = Postgres::new(&config, wake.clone())?;
    pg.prepare()?;
    let identity = Identity {
        name: config.name.clone(),
        cluster: config.cluster.clone(),
        tags: config.tags.clone(),
        fallback_demote_margin: dynamic.demote_margin(),
        reclone_on_rewind_failure: config.postgresql.reclone_on_rewind_failure,
    };
    let (snapshot, snapshot_rx) = watch::channel(initial_snapshot(&config, &dynamic));
    let listener = tokio::net::TcpListener::bind(config.api.listen)
        .await
        .with_context(|| format!("api.listen: cannot listen on {}", config.api.listen))?;
    tokio::spawn(api::serve(
        listener,
        api::router(snapshot_rx, dcs.lease()),
        stop.clone(),
    ));
    let (operator_sender, operator_requests) = mpsc::channel(8);
    if let Some(grpc) = &config.grpc {
        let listener = tokio::net::TcpListener::bind(grpc.listen)
            .await
            .with_context(|| format!("grpc.listen: cannot listen on {}", grpc.listen))?;
        let token = grpc.token().context("grpc.token_file")?;
        let service = control::ControlService::new(
            dcs.clone(),
            &config.cluster,
            &config.name,
            token,
            dynamic.clone(),
            operator_sender,
        );
        tokio::spawn(control::serve(listener, service, stop.clone()));
    }
    dcs.apply_config(&dynamic);
    tokio::spawn(dcs.clone().run_keepalive(wake.clone(), stop.clone()));
    tokio::spawn(dcs.clone().run_watch(wake.clone(), stop.clone()));
    let fence = Arc::new(FenceTarget::default());
    tokio::spawn(run_fence_watchdog(
        dcs.lease(),
        fence.clone(),
        wake.clone(),
        stop.clone(),
    ));
    tracing::info!(
        member = %config.name,
        cluster = %config.cluster,
        api = %config.api_url(),
        "jai-agent started"
    );
    let unrewound_marker = UnrewoundMarker::load(&config.state_dir);
    let mut core = Core::new(identity);
    if unrewound_marker.present() {
        core.restore_unrewound_former_primary();
        tracing::warn!(
            "{} says this data is a former primary not rewound yet: it rewinds before following a leader",
            unrewound_marker.path().display()
        );
    }
    let mut agent = Agent {
        core,
        unrewound_marker,
        clock: Clock::new(),
        dcs,
        pg,
        dynamic,
        view: None,
        last_reason: None,
        last_errors: Default::default(),
        snapshot,
        fence,
        last_rewind: None,
        haproxy: config.haproxy.clone().map(crate::haproxy::Balancers::new),
        operator_requests,
        handing_over: false,
        http: reqwest::Client::builder()
            .no_proxy()
            .timeout(PEER_TIMEOUT)
            .build()
            .context("building the HTTP client")?,
        config,
    };
    agent.run_loop(&wake, &stop).await;
    agent.shutdown().await
}

fn initial_snapshot(config: &AgentConfig, dynamic: &DynamicConfig) -> NodeSnapshot {
    NodeSnapshot {
        member: MemberStatus {
            name: config.name.clone(),
            role: MemberRole::Unknown,
            state: MemberState::Stopped,
            reason: Some("starting up".into()),
            api_url: config.api_url(),
            pg_address: config.pg_address(),
            grpc_url: config.grpc_url(),
            system_id: None,
            timeline: None,
            write_lsn: None,
            receive_lsn: None,
            replay_lsn: None,
            tags: config.tags.clone(),
            standing_down: false,
            streaming: None,
            standbys: Vec::new(),
            version: env!("CARGO_PKG_VERSION").into(),
        },
        leader: None,
        holds_leader_key: false,
        demoting: false,
        lag_bytes: None,
        dcs_reachable: false,
        demote_margin: dynamic.demote_margin(),
        heartbeat: Instant::now(),
        liveness_window: dynamic.ttl,
        postgres_pid: None,
        leader_runs_primary: false,
    }
}

impl Agent {
    async fn run_loop(&mut self, wake: &Notify, stop: &CancellationToken) {
        let mut immediate = 0;
        while !stop.is_cancelled() {
            let recheck = self.cycle().await;
            if recheck && immediate < MAX_IMMEDIATE_RECHECKS {
                immediate += 1;
                continue;
            }
            immediate = 0;
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = wake.notified() => {}
                _ = tokio::time::sleep(self.dynamic.loop_wait) => {}
                Some(request) = self.operator_requests.recv() => {
                    let outcome = self.run_operator_request(request.kind).await;
                    let _ = request.reply.send(outcome);
                }
            }
        }
    }

    /// One observe–decide–act round. Returns whether to decide again at once.
    async fn cycle(&mut self) -> bool {
        let observation = self.observe().await;
        self.arm_fence(&observation);
        let decision = self.core.decide(&observation);
        if !self.persist_core_memory() {
            return false;
        }
        self.report(&observation, &decision).await;
        self.reconcile_haproxy(&observation).await;
        let mut recheck = false;
        self.handing_over = decision.actions.contains(&Action::Checkpoint);
        for action in &decision.actions {
            match self.execute(action).await {
                Ok(()) => recheck |= action.warrants_immediate_recheck(),
                // Housekeeping (slots, status) failing must not hold up the rest.
                Err(error) if !action.warrants_immediate_recheck() => {
                    self.note_error(&format!("{action:?} failed"), &error);
                }
                Err(error) => {
                    self.note_error(&format!("{action:?} failed"), &error);
                    return false;
                }
            }
        }
        recheck
    }

    /// The leader re-sends its routing to every HAProxy in the background: at
    /// its first round as leader (start-up), every `haproxy::RECONCILE_EVERY`,
    /// and every round to one in an outage until it answers, so a restarted
    /// HAProxy or a missed push heals by itself. Only while it is a writable
    /// primary: what `/primary` says.
    async fn reconcile_haproxy(&mut self, observation: &Observation) {
        let writable_primary = matches!(&observation.pg.process, PgProcess::Running(pg) if pg.role == PgRole::Primary)
            && observation
                .dcs
                .as_ref()
                .and_then(|view| view.leader.as_ref())
                .is_some_and(|leader| leader.mine)
            && self
                .dcs
                .lease()
                .is_valid_beyond(self.dynamic.demote_margin());
        if let Some(haproxy) = self.haproxy.clone().filter(|_| writable_primary) {
            if haproxy.reconcile_due() {
                haproxy.reconcile_in_background(self.haproxy_routing(&haproxy));
            }
        }
    }

    /// Tells the fencing watchdog which postmaster to stop if the lease runs out.
    fn arm_fence(&self, observation: &Observation) {
        let primary =
            matches!(&observation.pg.process, PgProcess::Running(pg) if pg.role == PgRole::Primary);
        let pid = if primary {
            self.pg.pid().unwrap_or(0)
        } else {
            0
        };
        self.fence.primary_pid.store(pid, Ordering::SeqCst);
        self.fence.margin_ms.store(
            self.dynamic.demote_margin().as_millis() as u64,
            Ordering::SeqCst,
        );
    }

    async fn observe(&mut self) -> Observation {
        let (process, running_identity) = self.pg.observe().await;
        let data_dir = match running_identity {
            Some((system_id, was_primary)) => DataDir::Initialized {
                system_id,
                was_primary,
            },
            None => self.pg.inspect_data_dir().await,
        };
        let mut dcs = self.read_cluster().await;
        if dcs.is_some() && self.dcs.lease().id().is_none() {
            // Granted (or adopted) with the cluster's ttl, then read again so
            // the view knows which keys are on our lease.
            match self.dcs.ensure_lease(self.dynamic.ttl).await {
                Ok(_) => dcs = self.read_cluster().await,
                Err(error) => self.note_error("cannot get a lease from etcd", &error),
            }
        }
        if let (Some(view), PgProcess::Running(pg)) = (dcs.as_mut(), &process) {
            if view.leader.is_none() && pg.role == PgRole::Replica {
                self.refresh_peer_positions(view).await;
            }
        }
        self.view = dcs.clone();
        Observation {
            now: self.clock.now(),
            wall_clock_unix: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
            pg: LocalPostgres {
                data_dir,
                process,
                last_rewind: self.last_rewind.clone(),
            },
            dcs,
            lease: LeaseView {
                valid_until: dcs::lease_deadline_millis(&self.dcs.lease(), &self.clock),
            },
        }
    }

    /// During an election, positions in etcd can be a loop old: ask every peer's
    /// API directly (all at once, `PEER_TIMEOUT` each) and keep what answers.
    async fn refresh_peer_positions(&self, view: &mut ClusterView) {
        let me = self.config.name.as_str();
        let mut requests = tokio::task::JoinSet::new();
        for member in view.members.iter().filter(|member| member.name != me) {
            let url = format!("{}/status", member.api_url);
            let http = self.http.clone();
            requests.spawn(async move {
                let response = http.get(url).send().await.ok()?;
                response.json::<MemberStatus>().await.ok()
            });
        }
        let fresh = requests.join_all().await;
        for status in fresh.into_iter().flatten() {
            if let Some(member) = view
                .members
                .iter_mut()
                .find(|member| member.name == status.name)
            {
                *member = status;
            }
        }
    }

    async fn read_cluster(&mut self) -> Option<ClusterView> {
        match self.dcs.read_cluster(&self.dynamic).await {
            Ok(view) => {
                self.note_success("etcd unreachable");
                if view.config != self.dynamic {
                    self.adopt_config(view.config.clone());
                }
                Some(view)
            }
            Err(error) => {
                self.note_error("etcd unreachable", &error);
                None
            }
        }
    }

    fn adopt_config(&mut self, config: DynamicConfig) {
        if config.pause != self.dynamic.pause {
            tracing::warn!(
                "maintenance mode {}",
                if config.pause { "on" } else { "off" }
            );
        }
        let parameters_changed = config.postgresql != self.dynamic.postgresql;
        tracing::info!(
            ttl = %humantime::format_duration(config.ttl),
            loop_wait = %humantime::format_duration(config.loop_wait),
            retry_timeout = %humantime::format_duration(config.retry_timeout),
            "using the cluster config from etcd"
        );
        self.dcs.apply_config(&config);
        self.dynamic = config;
        if parameters_changed && self.pg.is_running() {
            match self.reload_settings() {
                Ok(()) => {
                    tracing::info!("PostgreSQL parameters changed in the cluster config: reloaded")
                }
                Err(error) => self.note_error("cannot apply the new PostgreSQL parameters", &error),
            }
        }
    }

    /// Rewrites PostgreSQL's configuration for its current role from the
    /// cluster config in force, and reloads it.
    fn reload_settings(&mut self) -> Result<()> {
        let standby = self.pg_is_standby();
        let follow = self
            .pg
            .following()
            .map(str::to_owned)
            .and_then(|name| self.with_address(&name));
        self.write_pg_config(follow, standby)?;
        self.pg.reload()
    }

    /// `member` with its PostgreSQL address, when it registered one.
    fn with_address(&self, member: &str) -> Option<(String, String)> {
        self.address_of(member)
            .map(|address| (member.to_owned(), address))
    }

    /// Writes PostgreSQL's configuration files from the cluster config in
    /// force: as a standby streaming from `follow` (name, address), or as a
    /// primary.
    fn write_pg_config(&mut self, follow: Option<(String, String)>, standby: bool) -> Result<()> {
        self.pg.configure(
            &self.dynamic,
            follow
                .as_ref()
                .map(|(name, address)| (name.as_str(), address.as_str())),
            standby,
        )
    }

    /// Whether the running PostgreSQL is a standby, as last published.
    fn pg_is_standby(&self) -> bool {
        self.snapshot.borrow().member.role != MemberRole::Primary
    }

    /// Runs an operator's request from the control API and says what it did.
    async fn run_operator_request(&mut self, kind: OperatorRequestKind) -> Result<String, String> {
        tracing::warn!(?kind, "operator request");
        let outcome = match kind {
            OperatorRequestKind::Reload => {
                if !self.pg.is_running() {
                    return Err("PostgreSQL is not running: nothing to reload".into());
                }
                self.reload_settings()
                    .map(|()| "PostgreSQL settings rewritten and reloaded".to_owned())
            }
            OperatorRequestKind::Restart { only_if_pending } => {
                self.restart_postgres(only_if_pending).await
            }
            OperatorRequestKind::Reinitialize => self.reinitialize().await,
        };
        outcome.map_err(|error| format!("{error:#}"))
    }

    /// Stops PostgreSQL and starts it again in the same role. A leader keeps
    /// its key throughout (a restart is not a failover, DESIGN.md §3.6).
    async fn restart_postgres(&mut self, only_if_pending: bool) -> Result<String> {
        let PgProcess::Running(running) = self.pg.observe().await.0 else {
            anyhow::bail!("PostgreSQL is not running: the agent starts it when it may");
        };
        if only_if_pending && !self.pg.restart_pending().await? {
            return Ok("no setting waits for a restart: nothing done".into());
        }
        let primary = running.role == PgRole::Primary;
        if primary {
            let me = self.config.name.clone();
            self.push_to_haproxy(|backend| crate::haproxy::stop_writes_to(backend, &me))
                .await;
        }
        self.pg.stop(self.dynamic.retry_timeout).await?;
        let start_as = if primary {
            StartAs::Primary
        } else {
            StartAs::Replica {
                follow: running.following.clone(),
            }
        };
        self.execute(&Action::Start(start_as)).await?;
        if primary {
            self.route_haproxy_writes_here().await;
        }
        Ok(format!(
            "PostgreSQL restarted as {}",
            if primary { "primary" } else { "replica" }
        ))
    }

    /// Wipes this member's data directory so the core clones it again from
    /// the leader. Refused on the leader and when no leader runs.
    async fn reinitialize(&mut self) -> Result<String> {
        let view = self
            .dcs
            .read_cluster(&self.dynamic)
            .await
            .context("etcd must answer before a member is reinitialised")?;
        let leader = view.leader.as_ref().ok_or_else(|| {
            anyhow!("no leader to clone from: reinitialising now would leave this member empty")
        })?;
        anyhow::ensure!(
            !leader.mine,
            "this member is the leader: switch over first (`jaictl switchover --from {}`)",
            leader.name
        );
        self.pg.stop(self.dynamic.retry_timeout).await?;
        self.pg.wipe_data_dir()?;
        self.last_rewind = None;
        tracing::warn!(leader = %leader.name, "data directory wiped on operator request: cloning again");
        Ok(format!(
            "data directory wiped; cloning from {} (watch `jaictl status`)",
            leader.name
        ))
    }

    /// Logs a changed reason, publishes the member status and the API snapshot.
    async fn report(&mut self, observation: &Observation, decision: &Decision) {
        if decision.reason != self.last_reason {
            if let Some(reason) = &decision.reason {
                match decision.state {
                    MemberState::Refused => tracing::error!("{reason}"),
                    _ => tracing::info!("{reason}"),
                }
            }
            self.last_reason = decision.reason.clone();
        }
        let member = self.member_status(observation, decision);
        if observation.dcs.is_some() && self.dcs.lease().id().is_some() {
            if let Err(error) = self.dcs.put_member(&member).await {
                self.note_error("cannot publish member status", &error);
            }
        }
        // While etcd does not answer, keep what it last said about the leader
        // and lag: the lease, checked at request time, decides whether this
        // primary may still take writes (DESIGN.md §3.1, §3.4).
        let previous = self.snapshot.borrow().clone();
        let (leader, holds_leader_key, lag_bytes, leader_runs_primary) = match &observation.dcs {
            Some(view) => (
                view.leader.as_ref().map(|leader| leader.name.clone()),
                view.leader.as_ref().is_some_and(|leader| leader.mine),
                view.last_leader
                    .as_ref()
                    .zip(member.wal_position())
                    .filter(|_| member.role == MemberRole::Replica)
                    .map(|(last, position)| last.optime.bytes_since(position)),
                view.leader.as_ref().is_some_and(|leader| {
                    !leader.mine && crate::ha::leader_runs_primary(view, &leader.name)
                }),
            ),
            None => (
                previous.leader,
                previous.holds_leader_key,
                previous.lag_bytes,
                previous.leader_runs_primary,
            ),
        };
        let snapshot = NodeSnapshot {
            leader,
            holds_leader_key,
            demoting: decision
                .actions
                .iter()
                .any(|action| matches!(action, Action::Stop { .. })),
            lag_bytes,
            dcs_reachable: observation.dcs.is_some(),
            demote_margin: self.dynamic.demote_margin(),
            heartbeat: Instant::now(),
            liveness_window: self.dynamic.ttl,
            postgres_pid: self.pg.pid(),
            leader_runs_primary,
            member,
        };
        self.snapshot.send_replace(snapshot);
    }

    fn member_status(&self, observation: &Observation, decision: &Decision) -> MemberStatus {
        let reach = MemberAddresses {
            api_url: self.config.api_url(),
            pg_address: self.config.pg_address(),
            grpc_url: self.config.grpc_url(),
        };
        self.core
            .member_status(observation, decision, reach, env!("CARGO_PKG_VERSION"))
    }

    /// Writes what the core must remember across restarts before anything
    /// is reported or done. False when "former primary, not rewound" could
    /// not be recorded: acting then (e.g. starting as a replica) could leave
    /// a restarted agent following a leader without a rewind, so this round
    /// does nothing and says why. Failing to clear the marker only costs a
    /// rewind after a restart: logged, not blocking.
    fn persist_core_memory(&mut self) -> bool {
        let wanted = self.core.unrewound_former_primary();
        match self.unrewound_marker.sync(wanted) {
            Ok(()) => {
                self.note_success("persisting the former-primary marker");
                true
            }
            Err(error) => {
                self.note_error("cannot persist the former-primary marker", &error);
                !wanted
            }
        }
    }

    /// Logs a failure once per outage: repeats of the same error go to debug,
    /// and the next success of the same kind is logged as a recovery.
    fn note_error(&mut self, what: &str, error: &anyhow::Error) {
        let text = format!("{error:#}");
        if self.last_errors.get(what) == Some(&text) {
            tracing::debug!("{what}: {text}");
        } else {
            tracing::warn!("{what}: {text}");
            self.last_errors.insert(what.to_owned(), text);
        }
    }

    fn note_success(&mut self, what: &str) {
        if self.last_errors.remove(what).is_some() {
            tracing::info!("{what}: recovered");
        }
    }

    fn leader_term(&self) -> Result<i64> {
        self.view
            .as_ref()
            .and_then(|view| view.leader.as_ref())
            .filter(|leader| leader.mine)
            .map(|leader| leader.term)
            .ok_or_else(|| anyhow!("this member does not hold the leader key"))
    }

    fn address_of(&self, member: &str) -> Option<String> {
        self.view
            .as_ref()
            .and_then(|view| view.member(member))
            .map(|status| status.pg_address.clone())
    }

    async fn execute(&mut self, action: &Action) -> Result<()> {
        match action {
            Action::ClaimInitialize => {
                if self
                    .dcs
                    .claim_initialize(&self.config.bootstrap.dcs)
                    .await?
                {
                    tracing::info!("won the bootstrap race");
                }
            }
            Action::InitDb => {
                tracing::info!("running initdb");
                self.pg.initdb().await?;
            }
            Action::PublishSystemId(system_id) => {
                self.pg.create_replication_role().await?;
                if self.dcs.publish_system_id(system_id).await? {
                    tracing::info!(system_id, "cluster bootstrapped");
                }
            }
            Action::CloneFrom(leader) => {
                let address = self
                    .address_of(leader)
                    .ok_or_else(|| anyhow!("leader {leader} has no registered address"))?;
                tracing::info!(leader, address, "cloning with pg_basebackup");
                self.pg.clone_from(&address).await?;
                // A fresh copy of the leader: any earlier rewind verdict is moot.
                self.last_rewind = None;
                tracing::info!("clone complete");
            }
            Action::Start(start_as) => {
                let follow = match start_as {
                    StartAs::Primary => None,
                    StartAs::Replica { follow } => {
                        follow.as_deref().and_then(|name| self.with_address(name))
                    }
                };
                let standby = !matches!(start_as, StartAs::Primary);
                if !standby {
                    self.ensure_lease_allows_writes()?;
                    self.pg.set_sync_names(self.sync_names_as_new_primary());
                }
                self.write_pg_config(follow, standby)?;
                tracing::info!(?start_as, "starting PostgreSQL");
                // A primary is guarded by the watchdog from its first moment,
                // not from the next observation.
                let fence = (!standby).then_some(&self.fence.primary_pid);
                self.pg.start(fence).await?;
            }
            Action::Stop { reason } => {
                tracing::warn!("stopping PostgreSQL: {reason}");
                let me = self.config.name.clone();
                self.push_to_haproxy(|backend| crate::haproxy::stop_writes_to(backend, &me))
                    .await;
                // A switchover's stop waits for the WAL senders to hand the
                // target every byte; escalating to an immediate shutdown would
                // cut that short (found by the simulator, seed 15768).
                let grace = if self.handing_over {
                    self.config.postgresql.start_timeout
                } else {
                    self.dynamic.retry_timeout
                };
                self.pg.stop(grace).await?;
            }
            Action::Promote { reason } => self.promote(reason).await?,
            Action::Rewind(leader) => {
                let term = self
                    .view
                    .as_ref()
                    .and_then(|view| view.leader.as_ref())
                    .filter(|key| &key.name == leader)
                    .map(|key| key.term)
                    .ok_or_else(|| anyhow!("{leader} no longer holds the leader key"))?;
                let address = self
                    .address_of(leader)
                    .ok_or_else(|| anyhow!("leader {leader} has no registered address"))?;
                // A failure to reach the leader is no verdict on the rewind:
                // it fails the action, and the next round tries again.
                self.pg.checkpoint_at(&address).await?;
                tracing::warn!(leader, address, "former primary: running pg_rewind");
                let error = match self.pg.rewind_from(&address).await {
                    Ok(printed) => {
                        let last_line = printed.lines().last().unwrap_or_default();
                        tracing::info!(leader, "pg_rewind: {last_line}");
                        None
                    }
                    Err(error) => {
                        tracing::error!("{error:#}");
                        Some(format!("{error:#}"))
                    }
                };
                self.last_rewind = Some(RewindOutcome {
                    leader_term: term,
                    error,
                });
            }
            Action::Follow(leader) => {
                let follow = match leader {
                    Some(name) => Some(self.with_address(name).ok_or_else(|| {
                        anyhow!("leader {name} has not registered its address yet")
                    })?),
                    None => None,
                };
                self.write_pg_config(follow, true)?;
                self.pg.reload()?;
                tracing::info!(leader = ?leader, "now following");
            }
            Action::AcquireLeader => {
                if self.dcs.acquire_leader().await? {
                    tracing::info!("acquired the leader key");
                } else {
                    tracing::info!("another member took the leader key first");
                }
            }
            Action::ReleaseLeader => {
                let term = self.leader_term()?;
                if self.handing_over {
                    self.publish_final_position(term).await?;
                }
                self.dcs.release_leader(term).await?;
                tracing::warn!("released the leader key");
            }
            Action::CreateSlot(slot) => {
                self.pg.create_slot(slot).await?;
                tracing::info!(slot, "created replication slot");
            }
            Action::DropSlot(slot) => {
                self.pg.drop_slot(slot).await?;
                tracing::info!(slot, "dropped replication slot");
            }
            Action::PublishLeaderStatus(status) => {
                let term = self.leader_term()?;
                self.dcs.publish_leader_status(status, term).await?;
            }
            Action::Checkpoint => {
                self.pg.checkpoint().await.context("CHECKPOINT")?;
            }
            Action::WriteSync(sync) => {
                let term = self.leader_term()?;
                anyhow::ensure!(
                    self.dcs.write_sync(sync, term).await?,
                    "the leader key changed: sync key not written"
                );
                tracing::info!(standbys = ?sync.members, "synchronous standbys recorded in etcd");
            }
            Action::SetSyncNames(names) => {
                self.pg.set_sync_names(names.clone());
                self.write_pg_config(None, false)?;
                self.pg.reload()?;
                self.pg.confirm_sync_names(names).await?;
                tracing::info!("synchronous_standby_names = '{}'", names.render());
            }
            Action::ClearSync => {
                let term = self.leader_term()?;
                if self.dcs.clear_sync(term).await? {
                    tracing::info!("synchronous mode off: sync key removed");
                }
            }
            Action::ClearSwitchover { reason } => {
                let term = self.leader_term()?;
                if self.dcs.clear_switchover(term).await? {
                    tracing::warn!("switchover intent removed: {reason}");
                }
            }
        }
        Ok(())
    }

    /// After a switchover's clean stop: the shutdown checkpoint as the
    /// leader's last position, so the target promotes only once it has
    /// received everything (found by the simulator, seed 10796).
    async fn publish_final_position(&mut self, term: i64) -> Result<()> {
        let (timeline, optime) = self.pg.final_position().await?;
        let status = jai_proto::LeaderStatus {
            leader: self.config.name.clone(),
            timeline,
            optime,
        };
        anyhow::ensure!(
            self.dcs.publish_leader_status(&status, term).await?,
            "the leader key changed before the final position was published"
        );
        tracing::info!(%optime, timeline, "switchover: final WAL position published");
        Ok(())
    }

    /// `synchronous_standby_names` for this member as it becomes a primary.
    fn sync_names_as_new_primary(&self) -> SyncNames {
        self.view
            .as_ref()
            .map(|view| crate::ha::sync::names_for_new_primary(&self.config.name, view))
            .unwrap_or_default()
    }

    /// Tells every configured HAProxy to send writes here and nowhere else,
    /// and reads to the replicas within the lag bound.
    async fn route_haproxy_writes_here(&mut self) {
        if let Some(haproxy) = self.haproxy.clone() {
            haproxy.reconcile(&self.haproxy_routing(&haproxy)).await;
        }
    }

    /// The routing this member, as leader, wants from every HAProxy.
    fn haproxy_routing(&self, haproxy: &crate::haproxy::Balancers) -> crate::haproxy::Routing {
        let (members, position) = self.view.as_ref().map_or((&[][..], None), |view| {
            (
                &view.members[..],
                view.last_leader.as_ref().map(|last| last.optime),
            )
        });
        crate::haproxy::Routing::new(&self.config.name, members, position, haproxy.max_read_lag())
    }

    /// Sends the commands `build` makes for each backend (write, then read)
    /// to every configured HAProxy; failures are logged once per outage, never fatal.
    async fn push_to_haproxy(&mut self, build: impl Fn(&str) -> String) {
        if let Some(haproxy) = self.haproxy.clone() {
            haproxy.push(&haproxy.for_each_backend(build)).await;
        }
    }

    /// The core decided on a lease it saw; actions before this one (publishing
    /// the member status, a slow etcd) may have used that time up. Checked
    /// again right before PostgreSQL could start taking writes.
    fn ensure_lease_allows_writes(&self) -> Result<()> {
        anyhow::ensure!(
            self.dcs
                .lease()
                .is_valid_beyond(self.dynamic.demote_margin()),
            "leader lease no longer confirmed beyond the demotion margin: not becoming writable"
        );
        Ok(())
    }

    async fn promote(&mut self, reason: &str) -> Result<()> {
        let term = self.leader_term()?;
        let before = match self.pg.observe().await.0 {
            PgProcess::Running(pg) => pg,
            other => return Err(anyhow!("cannot promote: PostgreSQL is {other:?}")),
        };
        // Commits after the promotion wait for standbys as synchronous mode
        // requires from the first one: set before promoting.
        let sync_names = self.sync_names_as_new_primary();
        if sync_names != SyncNames::Off {
            self.pg.set_sync_names(sync_names.clone());
            let follow = before
                .following
                .as_deref()
                .and_then(|name| self.with_address(name));
            self.write_pg_config(follow, true)?;
            self.pg.reload()?;
            self.pg.confirm_sync_names(&sync_names).await?;
        }
        // Writes are routed away from every other member before this one can
        // take any: a former primary whose agent hangs keeps running until it
        // is fenced, and HAProxy must not hand it sessions while this one is
        // promoted (found by the chaos suite, seed 8, `sigstop-agent`).
        if let Some(haproxy) = self.haproxy.clone() {
            haproxy.cut_writes_except(&self.config.name).await;
        }
        self.ensure_lease_allows_writes()?;
        self.fence
            .primary_pid
            .store(self.pg.pid().unwrap_or(0), Ordering::SeqCst);
        tracing::warn!("promoting: {reason}");
        self.pg.promote().await?;
        let entry = HistoryEntry {
            timeline: before.timeline,
            lsn: before.wal_position(),
            reason: reason.to_owned(),
            time_unix: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
            new_leader: self.config.name.clone(),
        };
        if !self.dcs.append_history(entry, term).await? {
            tracing::warn!("history not appended: the leader key changed meanwhile");
        }
        tracing::warn!("promoted: now the primary");
        self.route_haproxy_writes_here().await;
        self.pg.spawn_checkpoint();
        Ok(())
    }

    /// SIGTERM: stop PostgreSQL cleanly first, then give up the leader key, so no
    /// replica promotes while this primary could still accept a write.
    async fn shutdown(mut self) -> Result<()> {
        tracing::info!("shutting down");
        self.snapshot.send_modify(|node| node.demoting = true);
        let term = self.leader_term().ok();
        self.pg
            .stop(self.config.postgresql.start_timeout)
            .await
            .context("stopping PostgreSQL")?;
        if let Some(term) = term {
            match self.dcs.release_leader(term).await {
                Ok(true) => tracing::info!("released the leader key"),
                Ok(false) => tracing::warn!("leader key already gone"),
                Err(error) => tracing::warn!("could not release the leader key: {error:#}"),
            }
        }
        if let Err(error) = self.dcs.leave().await {
            tracing::warn!("could not deregister from etcd: {error:#}");
        }
        tracing::info!("stopped");
        Ok(())
    }
}
