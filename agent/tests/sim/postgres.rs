//! A simulated PostgreSQL per member: a data directory with a WAL history, and
//! a server process that is stopped, starting or running as primary / standby.
//!
//! The WAL is modelled by *content*, not just by position: every promotion (and
//! every initdb) opens a new branch with a globally unique id, so two servers
//! that both say "timeline 2" but were promoted separately are told apart. A
//! standby only receives WAL from an upstream whose history contains its own
//! (real PostgreSQL refuses a timeline that forked before its position).

use jai_agent::ha::{DataDir, PgProcess, PgRole, RunningPostgres};
use jai_proto::{Lsn, StandbyLink};

/// A stretch of WAL written on one branch, from `start` to the next segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// First LSN of the stretch.
    pub start: u64,
    /// Unique id of the branch (one per initdb or promotion, cluster-wide).
    pub branch: u32,
    /// The timeline number PostgreSQL shows for it.
    pub timeline: u32,
}

/// The WAL a data directory holds: `[0, lsn)`, cut into branch segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wal {
    /// Segments in LSN order; the first starts at 0.
    pub segments: Vec<Segment>,
    /// End of the WAL.
    pub lsn: u64,
}

impl Wal {
    /// The branch that wrote the byte at `lsn` (or that will write it, past the end).
    fn branch_at(&self, lsn: u64) -> u32 {
        self.segments
            .iter()
            .rev()
            .find(|segment| segment.start <= lsn)
            .map_or(0, |segment| segment.branch)
    }

    /// The current timeline.
    pub fn timeline(&self) -> u32 {
        self.segments.last().map_or(0, |segment| segment.timeline)
    }

    /// The current branch: where this server's next WAL goes.
    pub fn branch(&self) -> u32 {
        self.segments.last().map_or(0, |segment| segment.branch)
    }

    /// This WAL is not a prefix of what `upstream` has or will write: some byte
    /// below our end differs from the upstream's. Streaming from it would mix
    /// two histories, so PostgreSQL refuses and `pg_rewind` is needed.
    pub fn diverges_from(&self, upstream: &Wal) -> bool {
        let boundaries = self
            .segments
            .iter()
            .chain(upstream.segments.iter())
            .map(|segment| segment.start)
            .filter(|start| *start < self.lsn);
        boundaries
            .chain(std::iter::once(0))
            .any(|at| self.branch_at(at) != upstream.branch_at(at))
            || (self.lsn > 0 && self.branch_at(self.lsn - 1) != upstream.branch_at(self.lsn - 1))
    }

    /// Takes the upstream's WAL up to `upto` (our history is a prefix of it).
    pub fn receive_from(&mut self, upstream: &Wal, upto: u64) {
        self.segments = upstream
            .segments
            .iter()
            .copied()
            .filter(|segment| segment.start < upto.max(1))
            .collect();
        self.lsn = upto;
    }

    /// A short description, for the trace: `tl2@1A2B`.
    pub fn describe(&self) -> String {
        format!("tl{}#{}@{:X}", self.timeline(), self.branch(), self.lsn)
    }
}

/// An initialised data directory.
#[derive(Debug, Clone)]
pub struct Files {
    /// `pg_controldata`'s system identifier.
    pub system_id: String,
    /// The WAL.
    pub wal: Wal,
    /// The control file says the server last ran (or shut down) as a primary.
    pub control_primary: bool,
    /// Physical replication slots.
    pub slots: Vec<String>,
    /// `primary_conninfo` in postgresql.conf: the member index to stream from.
    pub conf_follow: Option<usize>,
    /// `standby.signal` exists.
    pub standby_signal: bool,
}

/// The data directory.
#[derive(Debug, Clone)]
pub enum Data {
    /// Missing or empty.
    Empty,
    /// initdb or pg_basebackup under way (looks empty to the agent: the
    /// incomplete marker makes it wipe and redo).
    Incomplete,
    /// A cluster.
    Ready(Files),
}

/// The server process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Process {
    /// Not running.
    Stopped,
    /// Started, not yet answering queries.
    Starting,
    /// Answering queries.
    Running {
        /// Primary (not in recovery).
        primary: bool,
        /// A primary takes writes until it is told to shut down.
        accepting: bool,
        /// The member a standby streams from (what the server loaded).
        upstream: Option<usize>,
    },
}

/// Something the agent asked PostgreSQL (or its tools) to do that takes time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// `initdb`.
    InitDb,
    /// `pg_basebackup` from a member.
    Clone {
        /// The member cloned from.
        from: usize,
    },
    /// Start the server (as configured by the files).
    Start,
    /// Fast shutdown.
    Stop,
    /// `pg_promote()`.
    Promote,
    /// `pg_rewind` against a member (after a CHECKPOINT on it).
    Rewind {
        /// The source member.
        from: usize,
    },
    /// `CHECKPOINT` on the local server.
    Checkpoint,
}

/// An operation in progress.
#[derive(Debug, Clone, Copy)]
pub struct PendingOp {
    /// Its id, to match the completion event.
    pub id: u64,
    /// What it is.
    pub kind: OpKind,
}

/// One member's PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgSim {
    /// The data directory.
    pub data: Data,
    /// The server.
    pub process: Process,
    /// The operation under way, if any.
    pub op: Option<PendingOp>,
    /// Counts postmasters started, so a signal meant for one does not hit the next.
    pub generation: u64,
    /// Every start fails until then (real ms).
    pub broken_until: u64,
    /// The postmaster got SIGINT (fast shutdown): it never again answers as
    /// ready or finishes a promotion; it only exits.
    pub shutting_down: bool,
    /// A standby has caught up with its upstream since it connected:
    /// `pg_stat_replication` shows it `streaming` (before: `catchup`).
    pub caught_up: bool,
    /// When the last `CHECKPOINT` finished (real ms): a fast shutdown soon
    /// after it has little left to write.
    pub checkpointed_at: Option<u64>,
}

impl PgSim {
    /// A node with an empty data directory and no server.
    pub fn new() -> Self {
        Self {
            data: Data::Empty,
            process: Process::Stopped,
            op: None,
            generation: 0,
            broken_until: 0,
            shutting_down: false,
            caught_up: false,
            checkpointed_at: None,
        }
    }

    /// The data directory's files, if initialised.
    pub fn files(&self) -> Option<&Files> {
        match &self.data {
            Data::Ready(files) => Some(files),
            _ => None,
        }
    }

    /// Mutable files.
    pub fn files_mut(&mut self) -> Option<&mut Files> {
        match &mut self.data {
            Data::Ready(files) => Some(files),
            _ => None,
        }
    }

    /// The server accepts writes now.
    pub fn accepts_writes(&self) -> bool {
        matches!(
            self.process,
            Process::Running {
                primary: true,
                accepting: true,
                ..
            }
        )
    }

    /// The server runs and answers queries.
    pub fn is_running(&self) -> bool {
        matches!(self.process, Process::Running { .. })
    }

    /// A postmaster exists (running or starting).
    pub fn has_postmaster(&self) -> bool {
        !matches!(self.process, Process::Stopped)
    }

    /// What `Postgres::observe` and `inspect_data_dir` would report.
    /// `following` is the agent's memory of what it configured; `standbys`
    /// what `pg_stat_replication` shows (on a primary).
    pub fn observe(
        &self,
        following: Option<String>,
        standbys: Vec<StandbyLink>,
    ) -> (PgProcess, DataDir) {
        // A base backup or a rewound directory has a backup_label until it
        // starts: inspect_data_dir reports it as no former primary.
        let data_dir = match &self.data {
            Data::Empty | Data::Incomplete => DataDir::Empty,
            Data::Ready(files) => DataDir::Initialized {
                system_id: files.system_id.clone(),
                was_primary: match self.process {
                    Process::Running { primary, .. } => primary,
                    _ => files.control_primary,
                },
            },
        };
        let process = match (self.process, self.files()) {
            (Process::Stopped, _) => PgProcess::Stopped,
            (Process::Starting, _) | (Process::Running { .. }, None) => PgProcess::Unresponsive,
            (Process::Running { primary, .. }, Some(files)) => {
                let lsn = Some(Lsn(files.wal.lsn));
                PgProcess::Running(RunningPostgres {
                    role: if primary {
                        PgRole::Primary
                    } else {
                        PgRole::Replica
                    },
                    timeline: files.wal.timeline(),
                    write_lsn: if primary { lsn } else { None },
                    receive_lsn: if primary { None } else { lsn },
                    replay_lsn: if primary { None } else { lsn },
                    streaming: !primary && following.is_some(),
                    following: if primary { None } else { following },
                    slots: files.slots.clone(),
                    standbys: if primary { standbys } else { Vec::new() },
                    sync_names: Default::default(),
                })
            }
        };
        (process, data_dir)
    }
}
