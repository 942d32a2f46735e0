//! Faults, and the seeded schedule of them.
//!
//! The *default* profile holds the faults under which docs/architecture.md ("Safety invariants") promises
//! safety with the default timings (`ttl 4s >= loop_wait 1s + 2 * retry_timeout 1.5s`).
//! The opt-in kinds go beyond what the shell currently survives; each is
//! named after what it models and documented with the bug it exposes, so
//! they can join the default once the core/shell handles them.

use super::rng::Rng;
use jai_proto::DynamicConfig;

/// A message's one-way latency without a slow-link fault: up to 4 ms, plus a
/// spike of up to 300 ms for 1% of messages (see `env::Link::latency`).
pub const MAX_BASE_LATENCY_MS: u64 = 304;

/// How a cut link behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkMode {
    /// Connection refused / reset: new requests fail at once (a REJECT rule,
    /// or etcd's port closed). Requests already in flight are lost.
    Reject,
    /// Packets dropped (a DROP rule, a dead switch): every request hangs
    /// until `retry_timeout`.
    Blackhole,
}

/// One fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The agent and its PostgreSQL die together (node reboot, OOM of both);
    /// the agent restarts after `down_ms` with the data directory intact.
    Crash {
        /// Member index.
        member: usize,
        /// Downtime.
        down_ms: u64,
    },
    /// Only PostgreSQL dies; the agent notices through the child exit.
    PgCrash {
        /// Member index.
        member: usize,
    },
    /// PostgreSQL dies and fails to start again for `ms` (a full disk, a
    /// corrupt WAL segment): long enough, the leader gives its key up.
    PgBroken {
        /// Member index.
        member: usize,
        /// How long every start fails.
        ms: u64,
    },
    /// The agent is stopped (SIGSTOP) for `ms`; its PostgreSQL keeps running.
    Pause {
        /// Member index.
        member: usize,
        /// Duration.
        ms: u64,
    },
    /// The member cannot reach etcd for `ms`.
    Partition {
        /// Member index.
        member: usize,
        /// Duration.
        ms: u64,
        /// How the cut behaves.
        mode: LinkMode,
    },
    /// Every request between the member and etcd gets up to `max_extra_ms`
    /// of extra latency, each way, for `ms`.
    SlowLink {
        /// Member index.
        member: usize,
        /// Duration.
        ms: u64,
        /// Extra one-way latency bound.
        max_extra_ms: u64,
    },
    /// Each message between the member and etcd is lost with probability
    /// `loss_per_mille`/1000, for `ms` (lost requests hang until the timeout).
    FlakyLink {
        /// Member index.
        member: usize,
        /// Duration.
        ms: u64,
        /// Loss rate.
        loss_per_mille: u64,
    },
    /// etcd's raft leader changes: no answers for `outage_ms`, then every
    /// lease is extended to its full TTL.
    EtcdLeaderChange {
        /// How long etcd has no leader.
        outage_ms: u64,
    },
    /// An operator asks for a switchover (`jaictl switchover`), checked and
    /// recorded as the control API does.
    Switchover {
        /// The target member, or the best replica.
        to: Option<usize>,
        /// Scheduled this many seconds ahead, or at once.
        in_secs: Option<u64>,
        /// Accept a lagging target.
        force: bool,
        /// The operator cancels it this long after asking.
        cancel_after_ms: Option<u64>,
    },
    /// An operator asks for a failover to a member (`jaictl failover`): a
    /// switchover if the leader runs a primary.
    Failover {
        /// The target member.
        to: usize,
        /// Accept a lagging target.
        force: bool,
    },
    /// An operator turns maintenance mode on (`jaictl pause`) and off again
    /// `ms` later (`jaictl resume`, retried until it is written).
    Maintenance {
        /// How long.
        ms: u64,
    },
}

impl Fault {
    /// What happens, for the trace.
    pub fn describe(&self, names: &[String]) -> String {
        match *self {
            Fault::Crash { member, down_ms } => {
                format!("{} crashes (agent + PG) for {down_ms}ms", names[member])
            }
            Fault::PgCrash { member } => format!("{}'s PostgreSQL crashes", names[member]),
            Fault::PgBroken { member, ms } => format!(
                "{}'s PostgreSQL crashes and fails to start for {ms}ms",
                names[member]
            ),
            Fault::Pause { member, ms } => {
                format!("{}'s agent is stopped for {ms}ms", names[member])
            }
            Fault::Partition { member, ms, mode } => {
                format!("{} cut from etcd ({mode:?}) for {ms}ms", names[member])
            }
            Fault::SlowLink {
                member,
                ms,
                max_extra_ms,
            } => format!(
                "{}'s link to etcd slow (+{max_extra_ms}ms) for {ms}ms",
                names[member]
            ),
            Fault::FlakyLink {
                member,
                ms,
                loss_per_mille,
            } => format!(
                "{}'s link to etcd loses {}% for {ms}ms",
                names[member],
                loss_per_mille / 10
            ),
            Fault::EtcdLeaderChange { outage_ms } => {
                format!("etcd leader change: {outage_ms}ms without answers")
            }
            Fault::Switchover {
                to,
                in_secs,
                force,
                cancel_after_ms,
            } => format!(
                "switchover to {}{}{}{}",
                to.map_or("the best replica", |to| names[to].as_str()),
                in_secs.map_or(String::new(), |secs| format!(" in {secs}s")),
                if force { " (forced)" } else { "" },
                cancel_after_ms.map_or(String::new(), |ms| format!(", cancelled after {ms}ms")),
            ),
            Fault::Failover { to, force } => format!(
                "failover to {}{}",
                names[to],
                if force { " (forced)" } else { "" }
            ),
            Fault::Maintenance { ms } => format!("maintenance mode for {ms}ms"),
        }
    }

    /// An operator's call rather than a failure.
    pub fn is_operator(&self) -> bool {
        matches!(
            self,
            Fault::Switchover { .. } | Fault::Failover { .. } | Fault::Maintenance { .. }
        )
    }

    /// How long the fault lasts (0 for instantaneous ones).
    pub fn duration(&self) -> u64 {
        match *self {
            Fault::Crash { down_ms, .. } => down_ms,
            Fault::PgCrash { .. } => 0,
            Fault::PgBroken { ms, .. } => ms,
            Fault::Pause { ms, .. }
            | Fault::Partition { ms, .. }
            | Fault::SlowLink { ms, .. }
            | Fault::FlakyLink { ms, .. } => ms,
            Fault::EtcdLeaderChange { outage_ms } => outage_ms,
            Fault::Switchover {
                in_secs,
                cancel_after_ms,
                ..
            } => (in_secs.unwrap_or(0) * 1000).max(cancel_after_ms.unwrap_or(0)),
            Fault::Failover { .. } => 0,
            Fault::Maintenance { ms } => ms,
        }
    }
}

/// Which faults a history may contain, and how hard they hit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultProfile {
    /// Agent + PostgreSQL crashes.
    pub crash: bool,
    /// PostgreSQL-only crashes.
    pub pg_crash: bool,
    /// PostgreSQL failing to start for up to this long, ms.
    pub pg_broken_max_ms: Option<u64>,
    /// SIGSTOP of the agent, `(min, max)` ms.
    pub pause_ms: Option<(u64, u64)>,
    /// Fail-fast partitions from etcd.
    pub partition_reject: bool,
    /// Black-hole partitions from etcd.
    pub partition_blackhole: bool,
    /// Slow links: extra one-way latency bound in ms.
    pub slow_link_max_ms: Option<u64>,
    /// Lossy links: loss rate range in per mille.
    pub flaky_loss: Option<(u64, u64)>,
    /// etcd leader changes: outage range in ms.
    pub etcd_outage_ms: Option<(u64, u64)>,
    /// Black-hole a member right after it takes the leader key, half the time:
    /// the moment a new primary is least guarded.
    pub targeted_cut: bool,
    /// Crash a switchover target's PostgreSQL during the old primary's
    /// stop, half the time: the target misses the end of the handover.
    pub handover_crash: bool,
    /// Operator calls: switchovers, failovers, cancels, maintenance mode.
    pub operator: bool,
}

/// The opt-in fault kinds, with what each models. `JAI_SIM_FAULTS=a,b` adds them.
pub const OPT_IN: &[(&str, &str)] = &[
    (
        "blackhole",
        "partitions that drop packets, so requests hang until retry_timeout",
    ),
    (
        "long-pause",
        "SIGSTOP of an agent for up to 12 s while its PostgreSQL keeps running",
    ),
    (
        "flaky",
        "links losing 10-50% of messages (lost requests hang until retry_timeout)",
    ),
    (
        "slow-timeout",
        "latency spikes beyond retry_timeout (requests time out, some still apply)",
    ),
    (
        "targeted-cut",
        "half the time, black-hole the member that just took the leader key, for 1-8 s (until 60 s; the liveness bound counts from the last cut)",
    ),
    (
        "handover-crash",
        "half the time, crash a switchover target's PostgreSQL within 100 ms of the old primary's stop, so it misses the end",
    ),
];

impl FaultProfile {
    /// The faults the design promises to survive with the default timings
    /// (`DynamicConfig::default()`), derived from them.
    pub fn default_profile() -> Self {
        let config = DynamicConfig::default();
        let retry_ms = config.retry_timeout.as_millis() as u64;
        let margin_ms = config.demote_margin().as_millis() as u64;
        Self {
            crash: true,
            pg_crash: true,
            // Beyond primary_start_timeout now and then.
            pg_broken_max_ms: Some(config.primary_start_timeout.as_millis() as u64 + 10_000),
            // Short stalls (scheduler, a swapped-out page): half the demotion margin.
            pause_ms: Some((50, margin_ms / 2)),
            partition_reject: true,
            partition_blackhole: false,
            // Slow but answered within retry_timeout, latency spikes included.
            slow_link_max_ms: Some(retry_ms / 2 - MAX_BASE_LATENCY_MS - 20),
            flaky_loss: None,
            // A new etcd leader extends every lease, so even long elections are safe.
            etcd_outage_ms: Some((100, 3_000)),
            targeted_cut: false,
            handover_crash: false,
            operator: true,
        }
    }

    /// The default profile plus the named opt-in kinds (`all` for every one).
    pub fn with(names: &str) -> Result<Self, String> {
        let mut profile = Self::default_profile();
        for name in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match name {
                "default" => {}
                "all" => {
                    for (name, _) in OPT_IN {
                        profile.enable(name);
                    }
                }
                name if OPT_IN.iter().any(|(known, _)| *known == name) => profile.enable(name),
                other => {
                    let known: Vec<&str> = OPT_IN.iter().map(|(name, _)| *name).collect();
                    return Err(format!(
                        "unknown fault kind {other:?}; known: default, all, {}",
                        known.join(", ")
                    ));
                }
            }
        }
        Ok(profile)
    }

    fn enable(&mut self, name: &str) {
        match name {
            "blackhole" => self.partition_blackhole = true,
            "long-pause" => self.pause_ms = Some((50, 12_000)),
            "flaky" => self.flaky_loss = Some((100, 500)),
            "slow-timeout" => self.slow_link_max_ms = Some(3_000),
            "targeted-cut" => self.targeted_cut = true,
            "handover-crash" => self.handover_crash = true,
            _ => unreachable!("checked by the caller"),
        }
    }

    /// Draws the faults of one history: from `start` to `end` (real ms), one
    /// every 0.5–5 s.
    pub fn schedule(
        &self,
        rng: &mut Rng,
        members: usize,
        start: u64,
        end: u64,
    ) -> Vec<(u64, Fault)> {
        let mut faults = Vec::new();
        let mut at = start;
        loop {
            at += rng.range(500, 5_000);
            if at >= end {
                return faults;
            }
            if let Some(fault) = self.draw(rng, members) {
                faults.push((at, fault));
            }
        }
    }

    /// Draws the operator's calls of one history, from `start` to `end`: none
    /// in a quarter of the histories, else one every 3–15 s.
    pub fn operator_schedule(
        &self,
        rng: &mut Rng,
        members: usize,
        start: u64,
        end: u64,
    ) -> Vec<(u64, Fault)> {
        let mut calls = Vec::new();
        if !self.operator || rng.chance(250) {
            return calls;
        }
        let mut at = start + rng.range(0, 5_000);
        while at < end {
            let member = rng.range(0, members as u64 - 1) as usize;
            let call = match rng.weighted(&[3, 3, 2, 2]) {
                kind @ (0 | 1) => {
                    let in_secs = rng.chance(300).then(|| rng.range(1, 6));
                    let cancel_after_ms = match in_secs {
                        Some(secs) if rng.chance(400) => Some(rng.range(0, secs * 1000 + 1_000)),
                        _ => rng.chance(50).then(|| rng.range(0, 2_000)),
                    };
                    Fault::Switchover {
                        to: (kind == 1).then_some(member),
                        in_secs,
                        force: rng.chance(100),
                        cancel_after_ms,
                    }
                }
                2 => Fault::Failover {
                    to: member,
                    force: rng.chance(300),
                },
                _ => Fault::Maintenance {
                    ms: rng.range(2_000, 20_000),
                },
            };
            calls.push((at, call));
            at += rng.range(3_000, 15_000);
        }
        calls
    }

    fn draw(&self, rng: &mut Rng, members: usize) -> Option<Fault> {
        let member = rng.range(0, members as u64 - 1) as usize;
        let on = |enabled: bool, weight: u64| if enabled { weight } else { 0 };
        let weights = [
            on(self.crash, 3),
            on(self.pg_crash, 2),
            on(self.pause_ms.is_some(), 2),
            on(self.partition_reject, 4),
            on(self.partition_blackhole, 4),
            on(self.slow_link_max_ms.is_some(), 2),
            on(self.flaky_loss.is_some(), 2),
            on(self.etcd_outage_ms.is_some(), 2),
            on(self.pg_broken_max_ms.is_some(), 1),
        ];
        if weights.iter().all(|weight| *weight == 0) {
            return None;
        }
        Some(match rng.weighted(&weights) {
            0 => Fault::Crash {
                member,
                down_ms: rng.range(300, 12_000),
            },
            1 => Fault::PgCrash { member },
            2 => {
                let (lo, hi) = self.pause_ms.expect("weighted by it");
                Fault::Pause {
                    member,
                    ms: rng.range(lo, hi),
                }
            }
            3 => Fault::Partition {
                member,
                ms: rng.range(500, 15_000),
                mode: LinkMode::Reject,
            },
            4 => Fault::Partition {
                member,
                ms: rng.range(500, 15_000),
                mode: LinkMode::Blackhole,
            },
            5 => Fault::SlowLink {
                member,
                ms: rng.range(1_000, 15_000),
                max_extra_ms: self.slow_link_max_ms.expect("weighted by it"),
            },
            6 => {
                let (lo, hi) = self.flaky_loss.expect("weighted by it");
                Fault::FlakyLink {
                    member,
                    ms: rng.range(1_000, 15_000),
                    loss_per_mille: rng.range(lo, hi),
                }
            }
            7 => {
                let (lo, hi) = self.etcd_outage_ms.expect("weighted by it");
                Fault::EtcdLeaderChange {
                    outage_ms: rng.range(lo, hi),
                }
            }
            _ => Fault::PgBroken {
                member,
                ms: rng.range(1_000, self.pg_broken_max_ms.expect("weighted by it")),
            },
        })
    }
}
