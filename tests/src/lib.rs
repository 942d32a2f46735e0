//! `jai-lab`: a whole jai cluster on one machine, for the demo and the tests.
//!
//! - [`lab`]: start, describe (`lab.json`), fail and revive, and stop a lab.
//! - [`lab_app`]: the voting app in a lab (HAProxy HTTP frontend, `jai-app` instances) and a form-posting client.
//! - [`process`]: spawning and signalling the lab's processes by PID.
//! - [`wait`]: waiting on conditions with deadlines.
//! - [`faults`]: the chaos faults beyond stopping nodes and cutting them off etcd.
//! - [`bench`], [`chaos`]: benchmarks and the randomized chaos schedule.
//! - [`cpus`]: CPU partitions, so a benchmark can give PostgreSQL cores of its own.
//!
//! The `jai-lab` binary is a thin CLI over [`lab::Lab`]; the integration tests
//! in `tests/tests/` use the same library.

pub mod bench;
pub mod chaos;
pub mod cpus;
pub mod faults;
pub mod lab;
pub mod lab_app;
pub mod process;
pub mod wait;

pub use lab::{Lab, LabSpec, StopSignal, REPLICATION_USER};
