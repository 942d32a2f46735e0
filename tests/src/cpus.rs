//! CPU partitions for the benchmarks: which cores a process tree may run on.
//!
//! The founding document puts PostgreSQL on its own server and the load
//! balancer and app nodes on others. On a one-machine lab every process
//! competes for the same cores, so a benchmark that compares the app's vote
//! path with pgbench also measures how much CPU HAProxy, the app and the load
//! generator take away from PostgreSQL. A [`Partition`] gives the primary's
//! PostgreSQL one half of the cores and everything else the other half, so
//! that both sides of such a comparison get the same database capacity.

use anyhow::{bail, Context, Result};
use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;

use crate::process;

/// The cores this process may run on now.
pub fn available() -> Result<Vec<usize>> {
    let set = sched_getaffinity(Pid::from_raw(0)).context("reading this process's CPU affinity")?;
    Ok((0..CpuSet::count())
        .filter(|cpu| set.is_set(*cpu).unwrap_or(false))
        .collect())
}

/// Two disjoint sets of cores: one for the database, one for the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// The primary's PostgreSQL (postmaster and every backend it forks).
    pub database: Vec<usize>,
    /// Everything else: load generators, HAProxy, app, etcd, agents, replicas.
    pub rest: Vec<usize>,
}

impl Partition {
    /// Splits `cpus` in two halves (the database gets the lower half); `None`
    /// with fewer than two cores.
    pub fn halves(cpus: &[usize]) -> Option<Self> {
        if cpus.len() < 2 {
            return None;
        }
        let (database, rest) = cpus.split_at(cpus.len() / 2);
        Some(Self {
            database: database.to_vec(),
            rest: rest.to_vec(),
        })
    }
}

/// Restricts every thread of `roots` and of their descendants to `cpus`.
/// Processes they fork later inherit it. Returns how many processes were set;
/// a process that exits meanwhile is skipped.
pub fn pin_trees(roots: &[i32], cpus: &[usize]) -> Result<usize> {
    let set = cpu_set(cpus)?;
    let mut pinned = 0;
    for pid in process::descendants(roots) {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        let mut any = false;
        for tid in tasks.filter_map(|task| task.ok()?.file_name().to_str()?.parse::<i32>().ok()) {
            match sched_setaffinity(Pid::from_raw(tid), &set) {
                Ok(()) => any = true,
                Err(nix::errno::Errno::ESRCH) => {}
                Err(error) => {
                    return Err(error).with_context(|| format!("setting the CPUs of {pid}/{tid}"))
                }
            }
        }
        pinned += usize::from(any);
    }
    Ok(pinned)
}

fn cpu_set(cpus: &[usize]) -> Result<CpuSet> {
    if cpus.is_empty() {
        bail!("no CPU to run on");
    }
    let mut set = CpuSet::new();
    for cpu in cpus {
        set.set(*cpu)
            .with_context(|| format!("CPU {cpu} is beyond what this system supports"))?;
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_split_disjointly_and_need_two_cores() {
        assert_eq!(Partition::halves(&[0]), None);
        assert_eq!(
            Partition::halves(&[0, 1]),
            Some(Partition {
                database: vec![0],
                rest: vec![1]
            })
        );
        let three = Partition::halves(&[0, 2, 5]).unwrap();
        assert_eq!((three.database, three.rest), (vec![0], vec![2, 5]));
    }

    #[test]
    fn pinning_a_child_is_seen_in_its_affinity() {
        let cpus = available().unwrap();
        let Some(partition) = Partition::halves(&cpus) else {
            return;
        };
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        assert_eq!(pin_trees(&[pid], &partition.rest).unwrap(), 1);
        let set = sched_getaffinity(Pid::from_raw(pid)).unwrap();
        let seen: Vec<usize> = (0..CpuSet::count())
            .filter(|cpu| set.is_set(*cpu).unwrap())
            .collect();
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(seen, partition.rest);
    }
}
