//! Fault primitives of the chaos suite, beyond those of [`Lab`] itself
//! (`stop_node`, `cut_from_etcd`): a network cut between two members, the loss
//! of etcd's quorum, a frozen PostgreSQL, and a full disk.
//!
//! Every fault here is undone by its healing call, and by `down` or the drop
//! of a lab that `up` started: firewall rules, frozen processes, stopped etcd
//! members are not, but mounts and cgroups are removed by `down` too.
//!
//! Two of them need a chaos lab ([`crate::LabSpec::chaos`]):
//!
//! - **Cut between members.** Every node listens on the lab's one loopback
//!   address, so an address cannot tell the members apart. Instead each node's
//!   agent runs in a cgroup (v2) of its own, which its PostgreSQL, WAL
//!   receiver, `pg_basebackup` and `pg_rewind` inherit. A chain in `OUTPUT`
//!   marks every connection a node opens with the node's number
//!   (`-m cgroup --path … -j CONNMARK`), from the lab's start. A cut between A
//!   and B drops, both ways, the packets of connections opened by B to A's
//!   PostgreSQL, API and gRPC ports and of those opened by A to B's
//!   (`-m connmark` with `--dport` for requests, `--sport` for answers), so
//!   established replication streams stop too. HAProxy, etcd and the tests
//!   are in no node's cgroup: they still reach both members.
//! - **Disk full.** Each node's data directory lives on a tmpfs of its own
//!   (`DIR/nodes/<name>/disk`, [`DISK_MB`] MiB); the fault fills it with a
//!   ballast file, healing removes the file.

use crate::lab::{iptables, run_tool as run, Lab};
use crate::process::{self, is_alive};
use anyhow::{anyhow, Context, Result};
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Size of each node's disk in a chaos lab. tmpfs takes memory only for what
/// is written: a node starts with about 100 MiB, and every timeline switch
/// leaves up to `wal_keep_size` (128 MiB) of WAL segments of its own while the
/// WAL position is low, about 25 MiB a minute under the chaos schedule.
pub const DISK_MB: u64 = 1024;

/// The ballast file that fills a node's disk.
const BALLAST: &str = "ballast";

/// What a chaos lab set up, recorded in `lab.json` so that `down` removes it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChaosState {
    /// The lab's cgroup directory (one child per node), if created.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    /// Its path relative to the cgroup v2 root, as `iptables -m cgroup --path` wants it.
    #[serde(default)]
    pub cgroup_path: Option<String>,
    /// The tmpfs mounts (one per node's disk).
    #[serde(default)]
    pub mounts: Vec<PathBuf>,
    /// The iptables chain (hooked into `OUTPUT`) of cuts between members.
    #[serde(default)]
    pub member_chain: Option<String>,
    /// The pairs of members cut apart now.
    #[serde(default)]
    pub cut_pairs: Vec<(String, String)>,
}

/// Where the cgroup v2 hierarchy is mounted: `/sys/fs/cgroup` on a unified
/// system, `/sys/fs/cgroup/unified` on a hybrid one.
fn cgroup2_root() -> Option<PathBuf> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .map(PathBuf::from)
        .find(|root| {
            nix::sys::statfs::statfs(root)
                .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
        })
}

impl Lab {
    /// Creates the lab's cgroups and mounts each node's disk (before any agent
    /// starts); recorded in `lab.json` at once.
    pub(crate) fn prepare_chaos(&mut self) -> Result<()> {
        anyhow::ensure!(
            nix::unistd::Uid::effective().is_root(),
            "a chaos lab needs root (cgroups, tmpfs mounts, iptables)"
        );
        let root = cgroup2_root().ok_or_else(|| anyhow!("no cgroup v2 hierarchy mounted"))?;
        let name = format!("jai-lab-{}", self.desc.host.replace('.', "-"));
        let cgroup = root.join(&name);
        std::fs::create_dir_all(&cgroup)
            .with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        self.desc.chaos.cgroup = Some(cgroup.clone());
        self.desc.chaos.cgroup_path = Some(name.clone());
        self.save()?;
        let chain = self.ensure_member_chain()?;
        for (index, node) in self.desc.nodes.clone().into_iter().enumerate() {
            std::fs::create_dir_all(cgroup.join(&node.name))?;
            iptables(&[
                "-A",
                &chain,
                "-m",
                "cgroup",
                "--path",
                &format!("{name}/{}", node.name),
                "-m",
                "conntrack",
                "--ctstate",
                "NEW",
                "-j",
                "CONNMARK",
                "--set-xmark",
                &connection_mark(index),
            ])
            .context(
                "marking the nodes' connections needs iptables' cgroup and connmark matches",
            )?;
            if let Some(disk) = &node.disk {
                std::fs::create_dir_all(disk)?;
                run(
                    "mount",
                    &[
                        "-t",
                        "tmpfs",
                        "-o",
                        &format!("size={DISK_MB}m,mode=0755"),
                        "tmpfs",
                        &disk.to_string_lossy(),
                    ],
                )
                .with_context(|| format!("mounting a tmpfs on {}", disk.display()))?;
                self.desc.chaos.mounts.push(disk.clone());
                self.save()?;
            }
        }
        Ok(())
    }

    /// The cgroup directory node `name`'s agent runs in (chaos labs only).
    pub(crate) fn node_cgroup_dir(&self, name: &str) -> Option<PathBuf> {
        self.desc.chaos.cgroup.as_ref().map(|dir| dir.join(name))
    }

    /// Unmounts the disks and removes the cgroups (their processes are gone).
    pub(crate) fn release_chaos_setup(&mut self) {
        for mount in std::mem::take(&mut self.desc.chaos.mounts) {
            if run("umount", &[&mount.to_string_lossy()]).is_err() {
                // A backend that outlived its postmaster may hold a file open
                // for a moment: detach now, the kernel finishes later.
                let _ = run("umount", &["-l", &mount.to_string_lossy()]);
            }
        }
        if let Some(cgroup) = self.desc.chaos.cgroup.take() {
            for node in &self.desc.nodes {
                remove_cgroup(&cgroup.join(&node.name));
            }
            remove_cgroup(&cgroup);
        }
        self.desc.chaos.cgroup_path = None;
    }

    // ---- cut between members ----

    /// Cuts members `a` and `b` apart, both ways: neither reaches the other's
    /// PostgreSQL (replication, `pg_rewind`, `pg_basebackup`), API or gRPC
    /// port. Both still reach etcd, and HAProxy and clients still reach both.
    pub fn cut_between(&mut self, a: &str, b: &str) -> Result<()> {
        anyhow::ensure!(a != b, "cannot cut {a} from itself");
        let pair = pair_key(a, b);
        if self.desc.chaos.cut_pairs.contains(&pair) {
            return Ok(());
        }
        let chain = self.ensure_member_chain()?;
        for (from, to) in [(a, b), (b, a)] {
            for rule in self.member_cut_rules(from, to)? {
                iptables(
                    &[
                        &["-A", &chain][..],
                        &rule.iter().map(String::as_str).collect::<Vec<_>>(),
                    ]
                    .concat(),
                )?;
            }
        }
        self.desc.chaos.cut_pairs.push(pair);
        self.save()
    }

    /// Undoes [`Lab::cut_between`]; healing members that were not cut is fine.
    pub fn heal_between(&mut self, a: &str, b: &str) -> Result<()> {
        let pair = pair_key(a, b);
        let Some(chain) = self.desc.chaos.member_chain.clone() else {
            return Ok(());
        };
        for (from, to) in [(a, b), (b, a)] {
            for rule in self.member_cut_rules(from, to)? {
                let _ = iptables(
                    &[
                        &["-D", &chain][..],
                        &rule.iter().map(String::as_str).collect::<Vec<_>>(),
                    ]
                    .concat(),
                );
            }
        }
        self.desc.chaos.cut_pairs.retain(|cut| *cut != pair);
        self.save()
    }

    /// Cuts `name` apart from every other member ([`Lab::cut_between`] with each).
    pub fn isolate_member(&mut self, name: &str) -> Result<()> {
        for other in self.node_names() {
            if other != name {
                self.cut_between(name, &other)?;
            }
        }
        Ok(())
    }

    /// Heals every cut between members.
    pub fn heal_all_member_cuts(&mut self) -> Result<()> {
        for (a, b) in self.desc.chaos.cut_pairs.clone() {
            self.heal_between(&a, &b)?;
        }
        Ok(())
    }

    /// The rules (without chain) dropping both ways the packets of the
    /// connections `from` opened to `to`'s ports.
    fn member_cut_rules(&self, from: &str, to: &str) -> Result<Vec<Vec<String>>> {
        anyhow::ensure!(
            self.desc.chaos.cgroup_path.is_some(),
            "cutting members apart needs a chaos lab (LabSpec::chaos: per-node cgroups)"
        );
        let mark = connection_mark(self.node_index(from)?);
        let target = self.node(to)?;
        let ports = [&target.pg, &target.api, &target.grpc]
            .into_iter()
            .filter_map(|address| address.rsplit(':').next());
        let mut rules = Vec::new();
        for port in ports {
            // Requests go to the lab's address; answers come from it (to
            // whichever loopback address the connection was opened from).
            for (address, direction) in [("-d", "--dport"), ("-s", "--sport")] {
                rules.push(
                    [
                        "-p",
                        "tcp",
                        address,
                        &self.desc.host,
                        direction,
                        port,
                        "-m",
                        "connmark",
                        "--mark",
                        &mark,
                        "-j",
                        "DROP",
                    ]
                    .map(str::to_owned)
                    .to_vec(),
                );
            }
        }
        Ok(rules)
    }

    fn ensure_member_chain(&mut self) -> Result<String> {
        if let Some(chain) = &self.desc.chaos.member_chain {
            return Ok(chain.clone());
        }
        let chain = format!("JAI-{}-M", self.desc.host.replace('.', "-"));
        iptables(&["-N", &chain]).context("cutting members apart needs root and iptables")?;
        self.desc.chaos.member_chain = Some(chain.clone());
        self.save()?;
        iptables(&["-I", "OUTPUT", "-j", &chain])?;
        Ok(chain)
    }

    pub(crate) fn remove_member_cut_chain(&mut self) {
        if let Some(chain) = self.desc.chaos.member_chain.take() {
            let _ = iptables(&["-D", "OUTPUT", "-j", &chain]);
            let _ = iptables(&["-F", &chain]);
            let _ = iptables(&["-X", &chain]);
        }
        self.desc.chaos.cut_pairs.clear();
    }

    // ---- etcd quorum ----

    /// Kills (SIGKILL, by PID) the etcd members at `indexes`; with a majority
    /// of them gone, etcd has no quorum: no lease renews, no key changes.
    pub fn kill_etcd_members(&mut self, indexes: &[usize]) -> Result<Vec<String>> {
        let mut killed = Vec::new();
        for &index in indexes {
            let member = self
                .desc
                .etcd_members
                .get_mut(index)
                .ok_or_else(|| anyhow!("no etcd member #{index}"))?;
            if let Some(pid) = member.pid.take() {
                process::signal(pid, Signal::SIGKILL);
                process::wait_gone(pid, Duration::from_secs(5));
                killed.push(member.name.clone());
            }
        }
        self.save()?;
        Ok(killed)
    }

    /// Starts every etcd member this lab started that is not running; each
    /// rejoins with its data.
    pub fn restart_etcd_members(&mut self) -> Result<Vec<String>> {
        let mut started = Vec::new();
        for index in 0..self.desc.etcd_members.len() {
            let member = &self.desc.etcd_members[index];
            if member.pid.is_some_and(is_alive) {
                continue;
            }
            started.push(member.name.clone());
            self.start_etcd_member(index)?;
        }
        self.save()?;
        Ok(started)
    }

    // ---- frozen PostgreSQL ----

    /// Freezes node `name`'s PostgreSQL with SIGSTOP while its agent keeps
    /// running. PostgreSQL's children leave the postmaster's process group
    /// (`setsid`), so they are signalled one by one, by PID: the postmaster
    /// first (it can fork no more), then, for [`Freeze::Everything`], each of
    /// its children (backends, WAL writer, WAL sender or receiver, …).
    pub fn freeze_postgres(&mut self, name: &str, scope: Freeze) -> Result<()> {
        let index = self.node_index(name)?;
        let node = &mut self.desc.nodes[index];
        let pid = process::postmaster_pid(&node.data_dir)
            .ok_or_else(|| anyhow!("node {name}: PostgreSQL is not running"))?;
        process::signal(pid, Signal::SIGSTOP);
        if scope == Freeze::Everything {
            for child in process::children_of(pid) {
                process::signal(child, Signal::SIGSTOP);
            }
        }
        node.postgres_frozen = true;
        self.save()
    }

    /// Thaws what [`Lab::freeze_postgres`] froze: SIGCONT to the postmaster
    /// and every child of it (harmless when nothing is frozen).
    pub fn thaw_postgres(&mut self, name: &str) -> Result<()> {
        let index = self.node_index(name)?;
        thaw(&mut self.desc.nodes[index]);
        self.save()
    }

    /// [`Lab::thaw_postgres`] for every node.
    pub(crate) fn thaw_all_postgres(&mut self) {
        self.desc.nodes.iter_mut().for_each(thaw);
    }

    // ---- full disk ----

    /// Fills node `name`'s disk (chaos labs only) with a ballast file until
    /// the file system has no byte left. Returns how many bytes it took.
    pub fn fill_disk(&mut self, name: &str) -> Result<u64> {
        let disk = self.disk_of(name)?;
        let path = disk.join(BALLAST);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        let mut written = 0u64;
        // Bounded: the disk holds at most DISK_MB MiB.
        for chunk in [1 << 20, 4096, 512] {
            let block = vec![0xA5u8; chunk];
            for _ in 0..(DISK_MB << 20) / chunk as u64 + 1 {
                match file.write(&block) {
                    Ok(0) => break,
                    Ok(count) => written += count as u64,
                    Err(error) if error.raw_os_error() == Some(nix::libc::ENOSPC) => break,
                    Err(error) => return Err(error).context(format!("filling {}", path.display())),
                }
            }
        }
        Ok(written)
    }

    /// Removes the ballast of [`Lab::fill_disk`] (absent is fine).
    pub fn free_disk(&mut self, name: &str) -> Result<()> {
        let path = self.disk_of(name)?.join(BALLAST);
        match std::fs::remove_file(&path) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                Err(error).context(format!("removing {}", path.display()))
            }
            _ => Ok(()),
        }
    }

    fn disk_of(&self, name: &str) -> Result<PathBuf> {
        self.node(name)?
            .disk
            .clone()
            .ok_or_else(|| anyhow!("node {name} has no disk of its own (LabSpec::chaos makes one)"))
    }

    /// Whether this lab was started with [`crate::LabSpec::chaos`].
    pub fn is_chaos_lab(&self) -> bool {
        self.desc.chaos.cgroup_path.is_some() && !self.desc.chaos.mounts.is_empty()
    }

    /// Undoes every fault of this module and of `cut_from_etcd`: heals cuts,
    /// thaws PostgreSQL, frees disks, restarts stopped etcd members. Stopped
    /// or frozen agents are left to the caller (`start_node`).
    pub fn heal_everything(&mut self) -> Result<()> {
        self.heal_all_member_cuts()?;
        for name in self.node_names() {
            if !self.desc.etcd_members.is_empty() {
                self.heal_etcd(&name)?;
            }
            self.thaw_postgres(&name)?;
            if self.node(&name)?.disk.is_some() {
                self.free_disk(&name)?;
            }
        }
        self.restart_etcd_members()?;
        Ok(())
    }
}

/// The connection mark of node number `index` (low byte of the mark only).
fn connection_mark(index: usize) -> String {
    format!("{:#x}/0xff", index + 1)
}

/// What [`Lab::freeze_postgres`] stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freeze {
    /// The postmaster alone: sessions already open go on, new connections
    /// hang, a crashed backend is not cleaned up.
    Postmaster,
    /// The postmaster and every process it started: a hung database.
    Everything,
}

fn thaw(node: &mut crate::lab::NodeInfo) {
    if let Some(pid) = process::postmaster_pid(&node.data_dir) {
        process::signal(pid, Signal::SIGCONT);
        for child in process::children_of(pid) {
            process::signal(child, Signal::SIGCONT);
        }
    }
    node.postgres_frozen = false;
}

fn pair_key(a: &str, b: &str) -> (String, String) {
    if a <= b {
        (a.to_owned(), b.to_owned())
    } else {
        (b.to_owned(), a.to_owned())
    }
}

/// Removes an empty cgroup; its last processes may take a moment to leave.
fn remove_cgroup(dir: &Path) {
    for _ in 0..50 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}
