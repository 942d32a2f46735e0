//! `jai-lab`: start a jai cluster on this machine and fail and revive its nodes.

use anyhow::Result;
use clap::{Parser, Subcommand};
use jai_lab::faults::Freeze;
use jai_lab::{Lab, LabSpec, StopSignal};
use jai_proto::logging::LogFormat;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// A whole jai cluster on one machine: etcd, agents with PostgreSQL, HAProxy.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    command: Verb,
}

#[derive(Debug, Subcommand)]
enum Verb {
    /// Start a lab, wait until it is healthy, write DIR/lab.json.
    Up {
        /// Lab directory (everything is written under it).
        #[arg(long)]
        dir: PathBuf,
        /// Number of PostgreSQL nodes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Number of etcd members to start.
        #[arg(long, default_value_t = 3)]
        etcd_members: usize,
        /// Join these etcd client URLs (comma-separated) instead of starting etcd.
        #[arg(long, value_delimiter = ',')]
        etcd_endpoints: Option<Vec<String>>,
        /// Cluster name.
        #[arg(long, default_value = "jai")]
        cluster: String,
        /// HAProxy health-check interval.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        haproxy_check_interval: Duration,
        /// More HAProxy runtime API sockets (Unix path or HOST:PORT,
        /// comma-separated) every agent pushes to, e.g. one nobody answers on.
        #[arg(long, value_delimiter = ',', value_name = "SOCKET")]
        haproxy_extra_socket: Vec<String>,
        /// How long to wait for a healthy cluster.
        #[arg(long, default_value = "180s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Do not start the voting app (two jai-app instances behind HAProxy).
        #[arg(long)]
        no_app: bool,
        /// Prepare the chaos faults: a cgroup per node (for `cut-members`) and
        /// a small disk per node (for `fill-disk`). Needs root.
        #[arg(long)]
        chaos: bool,
        /// Log format of the agents and the app instances.
        #[arg(long, default_value = "text")]
        log_format: LogFormat,
    },
    /// Stop everything the lab in DIR started.
    Down {
        /// Lab directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Stop one node: KILL (agent and PostgreSQL die at once), TERM (graceful),
    /// STOP (freeze the agent), KILL-AGENT (agent only), KILL-PG (PostgreSQL only).
    StopNode {
        /// Node name, e.g. pg1.
        name: String,
        /// Lab directory.
        #[arg(long)]
        dir: PathBuf,
        /// KILL, TERM, STOP, STOP-UNFENCED, KILL-AGENT or KILL-PG.
        #[arg(long, default_value = "TERM")]
        signal: StopSignal,
    },
    /// Start a stopped node's agent again (or thaw a frozen one).
    StartNode {
        /// Node name, e.g. pg1.
        name: String,
        /// Lab directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Cut a node off etcd with firewall rules (needs root and iptables).
    CutEtcd {
        /// Node name, e.g. pg1.
        name: String,
        /// Lab directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Undo `cut-etcd` for a node.
    HealEtcd {
        /// Node name, e.g. pg1.
        name: String,
        /// Lab directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Chaos faults (docs/lab.md): cut two members apart (`cut-members A B`,
    /// `heal-members A B`), freeze or thaw a PostgreSQL (`freeze-pg NAME`,
    /// `freeze-postmaster NAME`, `thaw-pg NAME`), fill or free a node's disk (`fill-disk NAME`,
    /// `free-disk NAME`), kill etcd members by index (`kill-etcd 0 1`) or
    /// restart the stopped ones (`restart-etcd`).
    Fault {
        /// cut-members, heal-members, freeze-pg, freeze-postmaster, thaw-pg, fill-disk,
        /// free-disk, kill-etcd, restart-etcd.
        action: String,
        /// Node names or etcd member indexes.
        args: Vec<String>,
        /// Lab directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Print the lab's nodes and their state.
    Status {
        /// Lab directory.
        #[arg(long)]
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("jai-lab: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("jai-lab: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(verb: Verb) -> Result<()> {
    match verb {
        Verb::Up {
            dir,
            nodes,
            etcd_members,
            etcd_endpoints,
            cluster,
            haproxy_check_interval,
            haproxy_extra_socket,
            timeout,
            no_app,
            chaos,
            log_format,
        } => {
            let spec = LabSpec {
                app: (!no_app).then(|| jai_lab::lab_app::AppSpec {
                    log_format,
                    ..Default::default()
                }),
                chaos,
                agent_log_format: log_format,
                cluster,
                etcd_members,
                external_etcd: etcd_endpoints,
                haproxy_check_interval,
                haproxy_extra_sockets: haproxy_extra_socket,
                timeout,
                ..LabSpec::new(dir, nodes)
            };
            let mut lab = Lab::up(spec).await?;
            lab.detach();
            println!("{}", lab.status_table().await);
            print!("{}", lab.instructions()?);
        }
        Verb::Down { dir } => {
            Lab::open(&dir)?.down()?;
            println!("lab in {} stopped", dir.display());
        }
        Verb::StopNode { name, dir, signal } => {
            Lab::open(&dir)?.stop_node(&name, signal)?;
            println!("{name} stopped ({signal:?})");
        }
        Verb::StartNode { name, dir } => {
            Lab::open(&dir)?.start_node(&name)?;
            println!("{name} started");
        }
        Verb::CutEtcd { name, dir } => {
            Lab::open(&dir)?.cut_from_etcd(&name)?;
            println!("{name} cut off etcd");
        }
        Verb::HealEtcd { name, dir } => {
            Lab::open(&dir)?.heal_etcd(&name)?;
            println!("{name} reconnected to etcd");
        }
        Verb::Fault { action, args, dir } => {
            let mut lab = Lab::open(&dir)?;
            let names: Vec<&str> = args.iter().map(String::as_str).collect();
            match (action.as_str(), names.as_slice()) {
                ("cut-members", [a, b]) => lab.cut_between(a, b)?,
                ("heal-members", [a, b]) => lab.heal_between(a, b)?,
                ("freeze-pg", [name]) => lab.freeze_postgres(name, Freeze::Everything)?,
                ("freeze-postmaster", [name]) => lab.freeze_postgres(name, Freeze::Postmaster)?,
                ("thaw-pg", [name]) => lab.thaw_postgres(name)?,
                ("fill-disk", [name]) => {
                    let bytes = lab.fill_disk(name)?;
                    println!("{name}: {} MiB of ballast, disk full", bytes >> 20);
                }
                ("free-disk", [name]) => lab.free_disk(name)?,
                ("kill-etcd", indexes) if !indexes.is_empty() => {
                    let indexes = indexes
                        .iter()
                        .map(|index| index.parse::<usize>())
                        .collect::<Result<Vec<_>, _>>()?;
                    println!("killed {}", lab.kill_etcd_members(&indexes)?.join(", "));
                }
                ("restart-etcd", []) => {
                    println!("started {}", lab.restart_etcd_members()?.join(", "));
                }
                _ => anyhow::bail!(
                    "fault {action} {args:?}: expected cut-members A B, heal-members A B, \
                     freeze-pg NAME, freeze-postmaster NAME, thaw-pg NAME, fill-disk NAME, free-disk NAME, \
                     kill-etcd INDEX…, restart-etcd"
                ),
            }
            println!("{action} {}: done", args.join(" "));
        }
        Verb::Status { dir } => print!("{}", Lab::open(&dir)?.status_table().await),
    }
    Ok(())
}
