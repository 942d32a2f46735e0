//! The simulated PostgreSQL operations the shell asks for (initdb, clone,
//! start, stop, promote, pg_rewind, slots), their completion, and streaming
//! replication between members.

use super::agent::AgentEvent;
use super::env::{Env, Event};
use super::invariants::StopKind;
use super::postgres::{Data, Files, OpKind, PendingOp, Process, Segment, Wal};
use super::ViolationKind;
use jai_proto::{Lsn, StandbyLink};

/// A fast shutdown within this long (real ms) of a `CHECKPOINT` is short.
const RECENT_CHECKPOINT_MS: u64 = 5_000;

impl Env {
    /// Starts a PostgreSQL operation: `Ok(Some(id))` when it completes later
    /// ([`AgentEvent::PgDone`]), `Ok(None)` when there was nothing to do.
    pub fn begin_op(&mut self, member: usize, kind: OpKind) -> Result<Option<u64>, String> {
        let duration = match kind {
            OpKind::InitDb => {
                self.pgs[member].data = Data::Incomplete;
                self.rng.range(800, 2_500)
            }
            OpKind::Clone { from } => {
                if !self.pgs[from].is_running() {
                    return Err(format!(
                        "pg_basebackup: could not connect to {}: connection refused",
                        self.names[from]
                    ));
                }
                self.pgs[member].data = Data::Incomplete;
                self.rng.range(1_000, 4_000)
            }
            OpKind::Start => {
                let pg = &mut self.pgs[member];
                if pg.has_postmaster() {
                    return Ok(None);
                }
                if pg.files().is_none() {
                    return Err("postgres: not a database cluster directory".into());
                }
                pg.process = Process::Starting;
                pg.generation += 1;
                pg.shutting_down = false;
                pg.caught_up = false;
                self.rng.range(300, 1_500)
            }
            OpKind::Stop => {
                let pg = &mut self.pgs[member];
                match &mut pg.process {
                    Process::Stopped => return Ok(None),
                    Process::Running { accepting, .. } => *accepting = false,
                    Process::Starting => {}
                }
                let checkpointed = pg
                    .checkpointed_at
                    .is_some_and(|at| self.now < at + RECENT_CHECKPOINT_MS);
                if checkpointed {
                    self.rng.range(50, 300)
                } else if self.rng.chance(50) {
                    self.rng.range(600, 2_500)
                } else {
                    self.rng.range(50, 600)
                }
            }
            OpKind::Promote => {
                if !matches!(
                    self.pgs[member].process,
                    Process::Running { primary: false, .. }
                ) {
                    return Err("PostgreSQL: recovery is not in progress".into());
                }
                self.rng.range(10, 1_000)
            }
            OpKind::Rewind { from } => {
                if self.pgs[member].has_postmaster() {
                    return Err("pg_rewind: target server must be shut down cleanly".into());
                }
                if !self.pgs[from].is_running() {
                    return Err(format!(
                        "connecting to the leader at {}: connection refused",
                        self.names[from]
                    ));
                }
                self.rng.range(300, 2_500)
            }
            OpKind::Checkpoint => {
                if !self.pgs[member].is_running() {
                    return Err("PostgreSQL: connection refused".into());
                }
                self.rng.range(50, 800)
            }
        };
        let id = self.id();
        self.pgs[member].op = Some(PendingOp { id, kind });
        self.schedule(self.now + duration, Event::PgComplete { member, op: id });
        Ok(Some(id))
    }

    /// `Postgres::configure`: writes `primary_conninfo` and `standby.signal`.
    pub fn configure(&mut self, member: usize, follow: Option<usize>, standby: bool) {
        if let Some(files) = self.pgs[member].files_mut() {
            files.conf_follow = follow;
            files.standby_signal = standby;
        }
    }

    /// `Postgres::reload`: a running standby re-reads `primary_conninfo`.
    pub fn reload(&mut self, member: usize) -> Result<(), String> {
        let follow = self.pgs[member].files().and_then(|files| files.conf_follow);
        match &mut self.pgs[member].process {
            Process::Stopped => Err("PostgreSQL is not running".into()),
            Process::Starting => Ok(()),
            Process::Running {
                primary, upstream, ..
            } => {
                if !*primary && *upstream != follow {
                    *upstream = follow;
                    self.pgs[member].caught_up = false;
                }
                Ok(())
            }
        }
    }

    /// `pg_create_physical_replication_slot`.
    pub fn create_slot(&mut self, member: usize, slot: &str) -> Result<(), String> {
        let running = self.pgs[member].is_running();
        match self.pgs[member].files_mut() {
            Some(files) if running => {
                if files.slots.iter().any(|known| known == slot) {
                    return Err(format!("replication slot \"{slot}\" already exists"));
                }
                files.slots.push(slot.to_owned());
                Ok(())
            }
            _ => Err("PostgreSQL: connection refused".into()),
        }
    }

    /// `pg_drop_replication_slot`.
    pub fn drop_slot(&mut self, member: usize, slot: &str) -> Result<(), String> {
        let running = self.pgs[member].is_running();
        match self.pgs[member].files_mut() {
            Some(files) if running => {
                let before = files.slots.len();
                files.slots.retain(|known| known != slot);
                if files.slots.len() == before {
                    return Err(format!("replication slot \"{slot}\" does not exist"));
                }
                Ok(())
            }
            _ => Err("PostgreSQL: connection refused".into()),
        }
    }

    /// An operation finished: applies its effect and tells the agent. A fast
    /// shutdown of a primary ends only once every connected standby has all
    /// its WAL (the walsenders wait for the standbys' flush at shutdown).
    pub(super) fn complete_op(&mut self, member: usize, op: u64) {
        let Some(pending) = self.pgs[member].op.filter(|pending| pending.id == op) else {
            return;
        };
        if pending.kind == OpKind::Stop && self.walsenders_pending(member) {
            let at = self.now + self.rng.range(20, 60);
            return self.schedule(at, Event::PgComplete { member, op });
        }
        self.pgs[member].op = None;
        let result = match pending.kind {
            OpKind::InitDb => {
                self.finish_initdb(member);
                Ok(())
            }
            OpKind::Clone { from } => self.finish_clone(member, from),
            OpKind::Start => self.finish_start(member),
            OpKind::Stop => {
                if self.pgs[member].has_postmaster() {
                    self.note_stop(member, StopKind::Clean);
                }
                self.pgs[member].process = Process::Stopped;
                self.log(format!("{}: PG stopped", self.names[member]));
                // The postmaster was our child: its exit wakes the loop.
                self.notify_agent(member, AgentEvent::Wake);
                Ok(())
            }
            OpKind::Promote => self.finish_promote(member),
            OpKind::Rewind { from } => self.finish_rewind(member, from),
            OpKind::Checkpoint => {
                let running = self.pgs[member].is_running();
                if running {
                    self.pgs[member].checkpointed_at = Some(self.now);
                }
                running
                    .then_some(())
                    .ok_or_else(|| "CHECKPOINT: PostgreSQL is gone".to_owned())
            }
        };
        self.notify_agent(member, AgentEvent::PgDone { id: op, result });
    }

    /// initdb: a new system with its first branch (timeline 1).
    pub(super) fn finish_initdb(&mut self, member: usize) {
        self.next_system += 1;
        self.next_branch += 1;
        let wal = Wal {
            segments: vec![Segment {
                start: 0,
                branch: self.next_branch,
                timeline: 1,
            }],
            lsn: 0x0100_0000,
        };
        self.log(format!(
            "{}: initdb done, system {} {}",
            self.names[member],
            self.next_system,
            wal.describe()
        ));
        self.pgs[member].data = Data::Ready(Files {
            system_id: self.next_system.to_string(),
            wal,
            control_primary: true,
            slots: Vec::new(),
            conf_follow: None,
            standby_signal: false,
        });
    }

    /// pg_basebackup: a copy of the source as it is now, if it still runs.
    pub(super) fn finish_clone(&mut self, member: usize, from: usize) -> Result<(), String> {
        let source = &self.pgs[from];
        let (Some(files), Process::Running { .. }) = (source.files(), source.process) else {
            return Err(format!(
                "pg_basebackup: connection to {} lost",
                self.names[from]
            ));
        };
        let copy = Files {
            system_id: files.system_id.clone(),
            wal: files.wal.clone(),
            // backup_label: no former primary until it starts.
            control_primary: false,
            slots: Vec::new(),
            conf_follow: None,
            standby_signal: false,
        };
        self.log(format!(
            "{}: cloned from {} {}",
            self.names[member],
            self.names[from],
            copy.wal.describe()
        ));
        self.pgs[member].data = Data::Ready(copy);
        Ok(())
    }

    /// The postmaster answers: primary without `standby.signal`, else a
    /// standby streaming from `primary_conninfo` (if any).
    pub(super) fn finish_start(&mut self, member: usize) -> Result<(), String> {
        let pg = &mut self.pgs[member];
        if pg.process != Process::Starting {
            return Err("PostgreSQL exited during start-up".into());
        }
        if pg.shutting_down {
            // Signalled while starting: it exits instead (see `pg_exit`).
            return Err("PostgreSQL: the database system is shutting down".into());
        }
        if self.now < pg.broken_until {
            pg.process = Process::Stopped;
            self.log(format!("{}: PG failed to start", self.names[member]));
            self.notify_agent(member, AgentEvent::Wake);
            return Err("PostgreSQL exited during start-up: PANIC: could not write to file".into());
        }
        let files = pg.files_mut().expect("checked when the start began");
        let primary = !files.standby_signal;
        if primary && self.handover.as_ref().is_some_and(|h| h.from == member) {
            // The old primary runs again: that switchover is over.
            self.handover = None;
        }
        let pg = &mut self.pgs[member];
        let files = pg.files_mut().expect("checked when the start began");
        files.control_primary = primary;
        let upstream = if primary { None } else { files.conf_follow };
        let wal = files.wal.describe();
        pg.process = Process::Running {
            primary,
            accepting: true,
            upstream,
        };
        let role = if primary {
            "primary".to_owned()
        } else {
            format!(
                "standby of {}",
                upstream.map_or("none", |index| self.names[index].as_str())
            )
        };
        self.log(format!(
            "{}: PG running as {role} {wal}",
            self.names[member]
        ));
        Ok(())
    }

    /// pg_promote: a new branch (timeline + 1) from the standby's position.
    pub(super) fn finish_promote(&mut self, member: usize) -> Result<(), String> {
        if !matches!(
            self.pgs[member].process,
            Process::Running { primary: false, .. }
        ) {
            return Err("PostgreSQL: promotion interrupted".into());
        }
        if self.pgs[member].shutting_down {
            // pg_promote against a postmaster in fast shutdown: the startup
            // process is terminated before the promotion ends.
            return Err("PostgreSQL: the database system is shutting down".into());
        }
        if let Some(wal) = self.pgs[member].files().map(|files| files.wal.clone()) {
            self.check_switchover_kept_writes(member, &wal);
        }
        self.next_branch += 1;
        let branch = self.next_branch;
        let pg = &mut self.pgs[member];
        let files = pg.files_mut().expect("a running server has files");
        let timeline = files.wal.timeline() + 1;
        let start = files.wal.lsn;
        files.wal.segments.push(Segment {
            start,
            branch,
            timeline,
        });
        files.control_primary = true;
        let wal = files.wal.describe();
        pg.process = Process::Running {
            primary: true,
            accepting: true,
            upstream: None,
        };
        self.stats.promotions += 1;
        self.log(format!("{}: PG promoted {wal}", self.names[member]));
        Ok(())
    }

    /// pg_rewind: a target whose WAL is not a prefix of the source's takes the
    /// source's history (blocks changed since the fork are copied back).
    pub(super) fn finish_rewind(&mut self, member: usize, from: usize) -> Result<(), String> {
        let Some(source) = self.pgs[from]
            .files()
            .filter(|_| self.pgs[from].is_running())
        else {
            return Err(format!(
                "pg_rewind: connection to {} lost",
                self.names[from]
            ));
        };
        if self.rng.chance(30) {
            return Err("pg_rewind: could not find previous WAL record".into());
        }
        let source_wal = source.wal.clone();
        let names = (self.names[member].clone(), self.names[from].clone());
        let files = self.pgs[member]
            .files_mut()
            .ok_or("pg_rewind: target has no data directory")?;
        let text = if files.wal.diverges_from(&source_wal) {
            let before = files.wal.describe();
            files.wal = source_wal;
            format!("rewound from {before} to {}", files.wal.describe())
        } else {
            "no rewind required".to_owned()
        };
        // backup_label: no former primary until it starts.
        files.control_primary = false;
        self.log(format!(
            "{}: pg_rewind against {}: {text}",
            names.0, names.1
        ));
        Ok(())
    }

    /// The fencing watchdog's or the fence keeper's SIGINT: a fast shutdown
    /// ends every session at once; the postmaster exits a little later.
    pub fn signal_stop(&mut self, member: usize, generation: u64) {
        let pg = &mut self.pgs[member];
        // A second SIGINT during a fast shutdown changes nothing.
        if pg.generation != generation || !pg.has_postmaster() || pg.shutting_down {
            return;
        }
        if let Process::Running { accepting, .. } = &mut pg.process {
            *accepting = false;
        }
        pg.shutting_down = true;
        let exit_after = self.rng.range(50, 600);
        self.schedule(self.now + exit_after, Event::PgExit { member, generation });
    }

    /// The signalled postmaster exits, unless another one runs by now; like
    /// any fast shutdown, once its connected standbys have all its WAL.
    pub(super) fn pg_exit(&mut self, member: usize, generation: u64) {
        if self.pgs[member].generation != generation {
            return;
        }
        if self.walsenders_pending(member) {
            let at = self.now + self.rng.range(20, 60);
            return self.schedule(at, Event::PgExit { member, generation });
        }
        self.note_stop(member, StopKind::Clean);
        self.stop_postmaster(member, "PG stopped (fenced)");
    }

    /// Arms `Postgres::stop`'s escalation of the stop `op` at real time `at`.
    pub fn escalate_stop_at(&mut self, member: usize, op: u64, at: u64) {
        self.schedule(at, Event::PgEscalate { member, op });
    }

    /// `Postgres::stop`'s escalation: a fast shutdown still under way after
    /// the grace (`retry_timeout`) becomes an immediate one (SIGQUIT), which
    /// does not wait for the standbys.
    pub fn escalate_stop(&mut self, member: usize, op: u64) {
        let pending = self.pgs[member].op.is_some_and(|pending| pending.id == op);
        if !pending || !self.pgs[member].has_postmaster() {
            return;
        }
        if self.paused[member] {
            // The agent that would send SIGQUIT is stopped itself.
            return self.schedule(self.now + 50, Event::PgEscalate { member, op });
        }
        self.note_stop(member, StopKind::Immediate);
        self.stop_postmaster(
            member,
            "PG stopped (fast shutdown too slow: immediate shutdown)",
        );
    }

    /// Whether `standby` streams from `upstream` now: running as its standby,
    /// through its slot, on a history that contains its own.
    pub(super) fn walsender_to(&self, standby: usize, upstream: usize) -> bool {
        let Process::Running {
            primary: false,
            upstream: Some(source),
            ..
        } = self.pgs[standby].process
        else {
            return false;
        };
        if source != upstream || standby == upstream || !self.pgs[upstream].is_running() {
            return false;
        }
        let slot = jai_agent::ha::slot_name(&self.names[standby]);
        match (self.pgs[standby].files(), self.pgs[upstream].files()) {
            (Some(mine), Some(theirs)) => {
                theirs.slots.contains(&slot) && !mine.wal.diverges_from(&theirs.wal)
            }
            _ => false,
        }
    }

    /// The members streaming from `member` now.
    pub(super) fn walsenders(&self, member: usize) -> Vec<usize> {
        (0..self.pgs.len())
            .filter(|standby| self.walsender_to(*standby, member))
            .collect()
    }

    /// A primary's walsenders still have WAL to send.
    fn walsenders_pending(&self, member: usize) -> bool {
        let pg = &self.pgs[member];
        let primary = matches!(pg.process, Process::Running { primary: true, .. });
        let end = pg.files().map_or(0, |files| files.wal.lsn);
        primary
            && self.walsenders(member).iter().any(|standby| {
                self.pgs[*standby]
                    .files()
                    .is_some_and(|files| files.wal.lsn < end)
            })
    }

    /// `pg_stat_replication` on `member`: its connected standbys, `streaming`
    /// once they caught up on its timeline, else `catchup`.
    pub fn standby_links(&self, member: usize) -> Vec<StandbyLink> {
        if !matches!(
            self.pgs[member].process,
            Process::Running { primary: true, .. }
        ) {
            return Vec::new();
        }
        let timeline = self.pgs[member].files().map(|files| files.wal.timeline());
        self.walsenders(member)
            .into_iter()
            .map(|standby| {
                let pg = &self.pgs[standby];
                let wal = pg.files().map(|files| &files.wal);
                let streaming = pg.caught_up && wal.map(|wal| wal.timeline()) == timeline;
                StandbyLink {
                    name: self.names[standby].clone(),
                    state: if streaming { "streaming" } else { "catchup" }.into(),
                    flush_lsn: wal.map(|wal| Lsn(wal.lsn)),
                    replay_lag_ms: None,
                    synchronous: false,
                }
            })
            .collect()
    }

    /// The postmaster is gone: operations waiting on it end, the agent wakes.
    pub(super) fn stop_postmaster(&mut self, member: usize, what: &str) {
        if !self.pgs[member].has_postmaster() {
            return;
        }
        self.pgs[member].process = Process::Stopped;
        self.log(format!("{}: {what}", self.names[member]));
        if let Some(pending) = self.pgs[member].op {
            if matches!(pending.kind, OpKind::Start | OpKind::Stop | OpKind::Promote) {
                self.complete_op(member, pending.id);
            }
        }
        self.notify_agent(member, AgentEvent::Wake);
    }

    /// PostgreSQL alone dies.
    pub(super) fn crash_pg(&mut self, member: usize) {
        self.note_stop(member, StopKind::Crash);
        self.stop_postmaster(member, "PG crashed");
    }

    /// Primaries write; standbys receive from their upstream if its history
    /// contains theirs (§3.5), behind by a random lag.
    pub(super) fn wal_tick(&mut self) {
        for pg in self.pgs.iter_mut() {
            if pg.accepts_writes() {
                let burst = if self.rng.chance(10) {
                    self.rng.range(1 << 20, 3 << 20)
                } else {
                    0
                };
                let written = self.rng.range(0, 8_192) + burst;
                if let Some(files) = pg.files_mut() {
                    files.wal.lsn += written;
                }
            }
        }
        for member in 0..self.pgs.len() {
            if let Process::Running {
                primary: false,
                upstream: Some(upstream),
                ..
            } = self.pgs[member].process
            {
                self.stream(member, upstream);
            }
        }
    }

    /// One tick of streaming from `upstream`: the standby counts as caught up
    /// (`streaming`) from the tick it reached the upstream's end while connected.
    pub(super) fn stream(&mut self, member: usize, upstream: usize) {
        let reached = self.stream_wal(member, upstream);
        let pg = &mut self.pgs[member];
        pg.caught_up = reached.is_some_and(|reached| reached || pg.caught_up);
    }

    /// Receives what the tick allows; `None` when not connected, else
    /// whether the standby reached the upstream's end.
    fn stream_wal(&mut self, member: usize, upstream: usize) -> Option<bool> {
        if upstream == member || !self.pgs[upstream].is_running() {
            return None;
        }
        let slot = jai_agent::ha::slot_name(&self.names[member]);
        let source = self.pgs[upstream].files()?.clone();
        if !source.slots.contains(&slot) {
            return None; // "replication slot does not exist": no streaming yet.
        }
        let mine = self.pgs[member].files()?;
        if mine.wal.diverges_from(&source.wal) {
            let key = (member, upstream, mine.wal.branch(), source.wal.branch());
            if self.diverged_seen.insert(key) {
                self.stats.diverged += 1;
                let message = format!(
                    "{} {} is pointed at {} {}: its history forked before the standby's position \
                     (PostgreSQL refuses to stream; pg_rewind needed)",
                    self.names[member],
                    mine.wal.describe(),
                    self.names[upstream],
                    source.wal.describe()
                );
                if self.strict_divergence {
                    self.violate(ViolationKind::DivergedStream, message);
                } else {
                    self.log(message);
                }
            }
            return None;
        }
        if source.wal.lsn > mine.wal.lsn {
            let upto = source
                .wal
                .lsn
                .min(mine.wal.lsn + self.rng.range(0, 512 * 1024));
            let files = self.pgs[member].files_mut().expect("checked above");
            files.wal.receive_from(&source.wal, upto);
            return Some(upto == source.wal.lsn);
        }
        Some(true)
    }
}
