//! The imperative shell: interprets the round driver's effects against etcd,
//! PostgreSQL, HAProxy and the disk, and waits for the next reason to look
//! again (an etcd watch event, PostgreSQL exiting, the lease lost, an
//! operator's request, or `loop_wait` passing).
//!
//! The order of a round's steps is not here: it is [`crate::ha::driver`]'s,
//! which the simulator runs too. This module only carries out one effect at
//! a time and reports its outcome, plus what runs beside the loop: the
//! keepalive and watch tasks, the fencing watchdog (and the fence keeper
//! process), the APIs, operator requests and the graceful shutdown.

use crate::api::{self, NodeSnapshot};
use crate::clock::Clock;
use crate::config::AgentConfig;
use crate::control::{self, OperatorRequest, OperatorRequestKind};
use crate::dcs::{self, Dcs};
use crate::fence::{self, FenceTarget};
use crate::ha::driver::{
    Command, Context, Driver, Effect, HaproxyOp, LeaseState, Level, Outcome, Peer, PgOp, Report,
    Setup, Upstream, PEER_TIMEOUT,
};
use crate::ha::{DataDir, Identity, LeaseView, MemberAddresses, PgProcess, PgRole};
use crate::keeper::KeeperLink;
use crate::persisted::UnrewoundMarker;
use crate::postgres::Postgres;
use anyhow::{anyhow, Context as _, Result};
use jai_proto::{DynamicConfig, MemberRole, MemberStatus};
use std::sync::Arc;
use std::time::{Instant, SystemTime};
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;

/// Everything the loop owns.
struct Agent {
    config: AgentConfig,
    dcs: Dcs,
    pg: Postgres,
    driver: Driver,
    clock: Clock,
    /// The cluster config in force, as the driver last applied it.
    dynamic: DynamicConfig,
    snapshot: watch::Sender<NodeSnapshot>,
    /// What the fencing watchdog guards: the postmaster, while it is a primary.
    fence: Arc<FenceTarget>,
    /// On disk: this member's data is a former primary not rewound yet.
    unrewound_marker: UnrewoundMarker,
    /// Asks peers for their WAL positions during an election.
    http: reqwest::Client,
    /// The HAProxys to push routing to, with their outage state.
    haproxy: Option<Arc<crate::haproxy::Balancers>>,
    /// Operator requests from the control API, run between two rounds.
    operator_requests: mpsc::Receiver<OperatorRequest>,
}

/// Runs the agent until `stop` is cancelled, then shuts down gracefully.
pub async fn run(config: AgentConfig, stop: CancellationToken) -> Result<()> {
    let dynamic = config.bootstrap.dcs.clone();
    let wake = Arc::new(Notify::new());
    let clock = Clock::new();
    let dcs = Dcs::connect(
        &config.etcd.endpoints,
        &config.cluster,
        &config.name,
        dynamic.retry_timeout,
    )
    .await?;
    let mut pg = Postgres::new(&config, wake.clone())?;
    pg.prepare()?;
    let setup = Setup {
        identity: Identity {
            name: config.name.clone(),
            cluster: config.cluster.clone(),
            tags: config.tags.clone(),
            fallback_demote_margin: dynamic.demote_margin(),
            reclone_on_rewind_failure: config.postgresql.reclone_on_rewind_failure,
        },
        bootstrap: dynamic.clone(),
        addresses: MemberAddresses {
            api_url: config.api_url(),
            pg_address: config.pg_address(),
            grpc_url: config.grpc_url(),
            pg_paths: Some(config.pg_paths()),
        },
        version: env!("CARGO_PKG_VERSION").into(),
        handover_stop_grace: config.postgresql.start_timeout,
    };
    let (snapshot, snapshot_rx) = watch::channel(initial_snapshot(&setup));
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
            crate::backup::Local::from_config(&config)?,
        );
        tokio::spawn(control::serve(listener, service, stop.clone()));
    }
    dcs.apply_config(&dynamic);
    tokio::spawn(dcs.clone().run_keepalive(clock, wake.clone(), stop.clone()));
    tokio::spawn(dcs.clone().run_watch(wake.clone(), stop.clone()));
    // Backups run beside the loop: a backup takes minutes, a round must not.
    tokio::spawn(
        crate::backup::Worker::new(
            dcs.clone(),
            crate::backup::Local::from_config(&config)?,
            dynamic.clone(),
        )
        .run(stop.clone()),
    );
    let fence = Arc::new(FenceTarget::default());
    fence::install_panic_hook(fence.clone());
    // Outside this process, so a frozen agent's primary is fenced too.
    fence.attach_keeper(
        dcs.lease(),
        KeeperLink::start(&config.state_dir, config.log.format),
    );
    tokio::spawn(fence::run_watchdog(
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
    if unrewound_marker.present() {
        tracing::warn!(
            "{} says this data is a former primary not rewound yet: it rewinds before following a leader",
            unrewound_marker.path().display()
        );
    }
    let mut agent = Agent {
        driver: Driver::new(setup, unrewound_marker.present()),
        unrewound_marker,
        clock,
        dcs,
        pg,
        dynamic,
        snapshot,
        fence,
        haproxy: config.haproxy.clone().map(crate::haproxy::Balancers::new),
        operator_requests,
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

fn initial_snapshot(setup: &Setup) -> NodeSnapshot {
    NodeSnapshot {
        report: Driver::starting_report(setup),
        heartbeat: Instant::now(),
        postgres_pid: None,
    }
}

impl Agent {
    /// Steps the driver: applies its commands, carries out its effect, and
    /// feeds the outcome back, until `stop` (checked between rounds).
    async fn run_loop(&mut self, wake: &Notify, stop: &CancellationToken) {
        let mut outcome = Outcome::Start;
        loop {
            let context = self.context();
            let step = self.driver.step(&context, outcome);
            for command in step.commands {
                self.apply(command);
            }
            outcome = match step.effect {
                Effect::Wait(duration) => {
                    if stop.is_cancelled() {
                        return;
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = wake.notified() => {}
                        _ = tokio::time::sleep(duration) => {}
                        Some(request) = self.operator_requests.recv() => {
                            let answer = self.run_operator_request(request.kind).await;
                            let _ = request.reply.send(answer);
                        }
                    }
                    Outcome::Woken
                }
                effect => self.perform(effect).await,
            };
        }
    }

    /// Time and lease, as the driver needs them at each step.
    fn context(&self) -> Context {
        let lease = self.dcs.lease();
        Context {
            now: self.clock.now(),
            wall_clock_unix: wall_clock_unix(),
            lease: LeaseState {
                id: lease.id(),
                valid_until: dcs::lease_deadline_millis(&lease, &self.clock),
            },
        }
    }

    /// Applies a command of the driver at once.
    fn apply(&mut self, command: Command) {
        match command {
            Command::Log(line) => match line.level {
                Level::Debug => tracing::debug!("{}", line.text),
                Level::Info => tracing::info!("{}", line.text),
                Level::Warn => tracing::warn!("{}", line.text),
                Level::Error => tracing::error!("{}", line.text),
            },
            Command::AdoptLease { id, valid_until } => {
                self.dcs
                    .lease()
                    .adopt(id, self.clock.instant_at(valid_until));
            }
            Command::ForgetLease(id) => self.dcs.lease().forget(id),
            Command::ApplyConfig {
                config,
                reload_postgres,
            } => {
                self.dcs.apply_config(&config);
                self.dynamic = *config;
                if reload_postgres && self.pg.is_running() {
                    match self.reload_settings() {
                        Ok(()) => tracing::info!(
                            "PostgreSQL parameters changed in the cluster config: reloaded"
                        ),
                        Err(error) => {
                            tracing::warn!("cannot apply the new PostgreSQL parameters: {error:#}")
                        }
                    }
                }
            }
            Command::ArmFence { primary } => {
                let pid = if primary {
                    self.pg.pid().unwrap_or(0)
                } else {
                    0
                };
                self.fence.arm(pid, self.dynamic.demote_margin());
            }
            Command::Publish(report) => self.publish(*report),
            Command::Decided {
                decision,
                lease_left_ms,
                etcd_reachable,
            } => tracing::debug!(
                actions = ?decision.actions,
                ?lease_left_ms,
                etcd_reachable,
                "decided"
            ),
            Command::ReconcileHaproxy => {
                if let Some(haproxy) = self.haproxy.clone() {
                    if haproxy.reconcile_due() {
                        haproxy.reconcile_in_background(self.haproxy_routing(&haproxy));
                    }
                }
            }
        }
    }

    /// Carries out one effect of the driver and says how it went.
    async fn perform(&mut self, effect: Effect) -> Outcome {
        match effect {
            Effect::ObservePostgres => {
                let (process, data_dir) = self.observe_postgres().await;
                Outcome::Postgres { process, data_dir }
            }
            Effect::Store(request) => Outcome::Store(self.dcs.execute(request).await),
            Effect::AskPeers(peers) => Outcome::Peers(self.ask_peers(peers).await),
            Effect::PersistMarker(wanted) => Outcome::Done(
                self.unrewound_marker
                    .sync(wanted)
                    .map_err(|error| format!("{error:#}")),
            ),
            Effect::Postgres(op) => self.perform_postgres(op).await,
            Effect::Haproxy(op) => {
                self.perform_haproxy(op).await;
                Outcome::Done(Ok(()))
            }
            Effect::Wait(_) => unreachable!("the loop waits itself"),
        }
    }

    async fn observe_postgres(&mut self) -> (PgProcess, DataDir) {
        let (process, running_identity) = self.pg.observe().await;
        if let PgProcess::Running(pg) = &process {
            if self
                .pg
                .end_catch_up_if_streaming(pg.role == PgRole::Replica && pg.streaming)
            {
                tracing::info!("caught up from the archive and streams: no more restore_command");
                if let Err(error) = self.reload_settings() {
                    tracing::warn!("reloading without restore_command: {error:#}");
                }
            }
        }
        let data_dir = match running_identity {
            Some((system_id, was_primary)) => DataDir::Initialized {
                system_id,
                was_primary,
            },
            None => self.pg.inspect_data_dir().await,
        };
        (process, data_dir)
    }

    /// During an election: every peer's status, straight from its API (all
    /// at once, [`PEER_TIMEOUT`] each); those that answer in time.
    async fn ask_peers(&self, peers: Vec<Peer>) -> Vec<MemberStatus> {
        let mut requests = tokio::task::JoinSet::new();
        for peer in peers {
            let url = format!("{}/status", peer.api_url);
            let http = self.http.clone();
            requests.spawn(async move {
                let response = http.get(url).send().await.ok()?;
                response.json::<MemberStatus>().await.ok()
            });
        }
        requests.join_all().await.into_iter().flatten().collect()
    }

    async fn perform_postgres(&mut self, op: PgOp) -> Outcome {
        let result = match op {
            PgOp::InitDb => self.pg.initdb().await,
            PgOp::CreateReplicationRole => self.pg.create_replication_role().await,
            PgOp::Clone { from } => {
                let backup = self.dynamic.backup.clone();
                let timeline = self.driver.view().and_then(|view| {
                    view.members
                        .iter()
                        .find(|member| member.pg_address == from)
                        .and_then(|member| member.timeline)
                });
                self.pg.clone_from(&from, timeline, backup.as_ref()).await
            }
            PgOp::Configure {
                follow,
                standby,
                sync_names,
            } => {
                if let Some(names) = sync_names {
                    self.pg.set_sync_names(names);
                }
                self.write_pg_config(follow, standby)
            }
            PgOp::Reload => self.pg.reload(),
            PgOp::ConfirmSyncNames(names) => self.pg.confirm_sync_names(&names).await,
            PgOp::Start { primary } => {
                // A primary is guarded by the watchdog from its first moment.
                let fence = primary.then_some(&*self.fence);
                self.pg.start(fence).await
            }
            PgOp::Stop { grace, .. } => self.pg.stop(grace).await,
            PgOp::Promote => self.pg.promote().await,
            PgOp::CheckpointAt { address } => self.pg.checkpoint_at(&address).await,
            PgOp::Rewind { address } => {
                return Outcome::Rewound(
                    self.pg
                        .rewind_from(&address)
                        .await
                        .map(|printed| printed.lines().last().unwrap_or_default().to_owned())
                        .map_err(|error| format!("{error:#}")),
                )
            }
            PgOp::CreateSlot(slot) => self.pg.create_slot(&slot).await,
            PgOp::DropSlot(slot) => self.pg.drop_slot(&slot).await,
            PgOp::Checkpoint => self.pg.checkpoint().await,
            PgOp::FinalPosition => {
                return Outcome::FinalPosition(
                    self.pg
                        .final_position()
                        .await
                        .map_err(|error| format!("{error:#}")),
                )
            }
            PgOp::RestoreToTime { target } => match self.dynamic.backup.clone() {
                Some(settings) => self.pg.restore_to_time(&settings, &target).await,
                None => Err(anyhow::anyhow!(
                    "the cluster config has no backup section: nothing to restore from"
                )),
            },
            PgOp::CheckpointInBackground => {
                self.pg.spawn_checkpoint();
                Ok(())
            }
        };
        Outcome::Done(result.map_err(|error| format!("{error:#}")))
    }

    /// HAProxy being unreachable never fails a step: the push logs the
    /// outage once and the leader's reconciliation heals it.
    async fn perform_haproxy(&mut self, op: HaproxyOp) {
        let Some(haproxy) = self.haproxy.clone() else {
            return;
        };
        let me = self.config.name.clone();
        match op {
            HaproxyOp::StopWritesToMe => {
                haproxy
                    .push(
                        &haproxy.for_each_backend(|backend| {
                            crate::haproxy::stop_writes_to(backend, &me)
                        }),
                    )
                    .await
            }
            HaproxyOp::CutWritesExceptMe => haproxy.cut_writes_except(&me).await,
            HaproxyOp::RouteWritesHere => haproxy.reconcile(&self.haproxy_routing(&haproxy)).await,
        }
    }

    /// What the health API answers from now on.
    fn publish(&mut self, report: Report) {
        let snapshot = NodeSnapshot {
            report,
            heartbeat: Instant::now(),
            postgres_pid: self.pg.pid(),
        };
        self.snapshot.send_replace(snapshot);
    }

    /// Rewrites PostgreSQL's configuration for its current role from the
    /// cluster config in force, and reloads it.
    fn reload_settings(&mut self) -> Result<()> {
        let standby = self.pg_is_standby();
        let follow = self
            .pg
            .following()
            .map(str::to_owned)
            .and_then(|name| self.upstream(&name));
        self.write_pg_config(follow, standby)?;
        self.pg.reload()
    }

    /// `member` with its PostgreSQL address, when it registered one.
    fn upstream(&self, member: &str) -> Option<Upstream> {
        let address = self.driver.view()?.member(member)?.pg_address.clone();
        Some(Upstream {
            name: member.to_owned(),
            address,
        })
    }

    /// Writes PostgreSQL's configuration files from the cluster config in
    /// force: as a standby streaming from `follow`, or as a primary.
    fn write_pg_config(&mut self, follow: Option<Upstream>, standby: bool) -> Result<()> {
        self.pg.configure(
            &self.dynamic,
            follow
                .as_ref()
                .map(|upstream| (upstream.name.as_str(), upstream.address.as_str())),
            standby,
        )
    }

    /// Whether the running PostgreSQL is a standby, as last published.
    fn pg_is_standby(&self) -> bool {
        self.snapshot.borrow().report.member.role != MemberRole::Primary
    }

    /// The routing this member, as leader, wants from every HAProxy.
    fn haproxy_routing(&self, haproxy: &crate::haproxy::Balancers) -> crate::haproxy::Routing {
        let (members, position) = self.driver.view().map_or((&[][..], None), |view| {
            (
                &view.members[..],
                view.last_leader.as_ref().map(|last| last.optime),
            )
        });
        crate::haproxy::Routing::new(&self.config.name, members, position, haproxy.max_read_lag())
    }

    fn leader_term(&self) -> Option<i64> {
        self.driver
            .view()
            .and_then(|view| view.leader.as_ref())
            .filter(|leader| leader.mine)
            .map(|leader| leader.term)
    }

    // ---- operator requests (between rounds) -------------------------------

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
    /// its key throughout (a restart is not a failover).
    async fn restart_postgres(&mut self, only_if_pending: bool) -> Result<String> {
        let PgProcess::Running(running) = self.pg.observe().await.0 else {
            anyhow::bail!("PostgreSQL is not running: the agent starts it when it may");
        };
        if only_if_pending && !self.pg.restart_pending().await? {
            return Ok("no setting waits for a restart: nothing done".into());
        }
        let primary = running.role == PgRole::Primary;
        if primary {
            self.perform_haproxy(HaproxyOp::StopWritesToMe).await;
        }
        self.pg.stop(self.dynamic.retry_timeout).await?;
        let follow = running
            .following
            .as_deref()
            .and_then(|name| self.upstream(name));
        if primary {
            // The same re-check as the driver's before a primary start.
            let context = self.context();
            let lease = LeaseView {
                valid_until: context.lease.valid_until,
            };
            anyhow::ensure!(
                lease.is_valid_beyond(context.now, self.dynamic.demote_margin()),
                "leader lease no longer confirmed beyond the demotion margin: PostgreSQL stays stopped; the agent starts it as its role allows"
            );
        }
        self.write_pg_config(follow, !primary)?;
        self.pg.start(primary.then_some(&*self.fence)).await?;
        if primary {
            self.perform_haproxy(HaproxyOp::RouteWritesHere).await;
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
        self.driver.data_dir_wiped();
        tracing::warn!(leader = %leader.name, "data directory wiped on operator request: cloning again");
        Ok(format!(
            "data directory wiped; cloning from {} (watch `jaictl status`)",
            leader.name
        ))
    }

    /// SIGTERM: stop PostgreSQL cleanly first, then give up the leader key, so no
    /// replica promotes while this primary could still accept a write.
    async fn shutdown(mut self) -> Result<()> {
        tracing::info!("shutting down");
        self.snapshot
            .send_modify(|node| node.report.demoting = true);
        let term = self.leader_term();
        self.pg
            .stop(self.config.postgresql.start_timeout)
            .await
            .context("stopping PostgreSQL")?;
        if let Some(term) = term {
            match self.dcs.release_leader(term).await {
                Ok(true) => tracing::info!("released the leader key"),
                Ok(false) => tracing::warn!("leader key already gone"),
                Err(error) => tracing::warn!("could not release the leader key: {error}"),
            }
        }
        if let Err(error) = self.dcs.leave().await {
            tracing::warn!("could not deregister from etcd: {error:#}");
        }
        tracing::info!("stopped");
        Ok(())
    }
}

fn wall_clock_unix() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}
