//! `jai-bench`: measure write unavailability on a lab (docs/benchmarks.md).

use anyhow::{Context, Result};
use clap::{Args as ClapArgs, Parser, Subcommand};
use jai_lab::bench::{self, BenchOptions, Fault};
use jai_lab::{Lab, LabSpec};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Benchmarks on a jai lab: numbers, not pass/fail.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    command: Bench,
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// SIGKILL the primary (agent and PostgreSQL) under a writer, N times:
    /// write unavailability, time to a new leader key, lost acknowledged writes.
    Failover(Common),
    /// `jaictl switchover` under a writer, N times: write unavailability (the
    /// gap between the last write on the old primary and the first on the
    /// new), time to a new leader key, lost acknowledged writes (must be 0).
    Switchover(Common),
    /// Runs the real `jaictl status` N times on a healthy lab: how fast an
    /// operator gets the table (process start, etcd read, rendering).
    Status(Common),
    /// A randomized, seeded schedule of faults on a chaos lab under the
    /// writer, with the one-writer and acknowledged-write checkers: prints a
    /// line per fault and a summary table; exits 1 on an invariant violation.
    Chaos(ChaosArgs),
}

/// What `chaos` takes.
#[derive(Debug, ClapArgs)]
struct ChaosArgs {
    /// No new fault starts after this long.
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Seed of the schedule (default: random; `JAI_CHAOS_SEED` overrides both).
    #[arg(long)]
    seed: Option<u64>,
    /// Lab directory: a new chaos lab is started there and stopped at the end.
    #[arg(long, default_value = "/tmp/jai-chaos")]
    dir: PathBuf,
    /// Number of PostgreSQL nodes.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Number of etcd members.
    #[arg(long, default_value_t = 3)]
    etcd_members: usize,
    /// Directory holding the jai-agent binary (default: beside jai-bench).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Shortest hold of a fault.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    hold_min: Duration,
    /// Longest hold of a fault.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    hold_max: Duration,
    /// How long the cluster may take to recover after a fault heals.
    #[arg(long, default_value = "90s", value_parser = humantime::parse_duration)]
    recovery_timeout: Duration,
    /// Draw only these faults (comma-separated names as in the table, e.g.
    /// `sigstop-agent,kill-primary`).
    #[arg(long, value_delimiter = ',')]
    faults: Option<Vec<String>>,
}

/// What every benchmark takes.
#[derive(Debug, ClapArgs)]
struct Common {
    /// Number of runs.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Lab directory: a new lab is started there (and stopped at the end)
    /// unless --reuse.
    #[arg(long, default_value = "/tmp/jai-bench")]
    dir: PathBuf,
    /// Use the lab already running in --dir (left running at the end).
    #[arg(long)]
    reuse: bool,
    /// Number of PostgreSQL nodes of a new lab.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Number of etcd members of a new lab.
    #[arg(long, default_value_t = 3)]
    etcd_members: usize,
    /// HAProxy health-check interval of a new lab.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    haproxy_check_interval: Duration,
    /// Directory holding the jai-agent binary of a new lab (default: beside jai-bench).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// `synchronous_mode` of a new lab: off, on or strict.
    #[arg(long, default_value = "off", value_parser = parse_mode)]
    synchronous_mode: jai_proto::SynchronousMode,
    /// Deadline of one run (healthy and writing, the fault, recovery).
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    run_timeout: Duration,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("jai-bench: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        tokio::select! {
            outcome = run(args.command) => outcome,
            // Dropping `run` drops a lab this process started, which kills it.
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        }
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("jai-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(bench: Bench) -> Result<()> {
    let (fault, common) = match bench {
        Bench::Chaos(args) => return chaos(args).await,
        Bench::Failover(common) => (Some(Fault::KillPrimary), common),
        Bench::Switchover(common) => (Some(Fault::Switchover), common),
        Bench::Status(common) => (None, common),
    };
    let mut lab = if common.reuse {
        Lab::open(&common.dir)?
    } else {
        eprintln!(
            "jai-bench: starting a lab of {} nodes and {} etcd members in {}",
            common.nodes,
            common.etcd_members,
            common.dir.display()
        );
        let spec = LabSpec {
            etcd_members: common.etcd_members,
            haproxy_check_interval: common.haproxy_check_interval,
            bin_dir: common.bin_dir.clone(),
            dcs: Some(jai_proto::DynamicConfig {
                synchronous_mode: common.synchronous_mode,
                ..jai_proto::DynamicConfig::default()
            }),
            ..LabSpec::new(&common.dir, common.nodes)
        };
        Lab::up(spec).await.context("starting the lab")?
    };
    let Some(fault) = fault else {
        bench::wait_settled(&lab, common.run_timeout).await?;
        print!("{}", bench::status_bench(&lab, common.runs)?);
        return Ok(());
    };
    anyhow::ensure!(
        lab.desc.nodes.len() >= 2,
        "a failover or switchover needs at least 2 nodes; the lab has {}",
        lab.desc.nodes.len()
    );
    let options = BenchOptions {
        runs: common.runs,
        run_timeout: common.run_timeout,
    };
    let report = bench::run_bench(&mut lab, fault, &options).await?;
    print!("{}", report.render());
    Ok(())
}

fn parse_mode(text: &str) -> Result<jai_proto::SynchronousMode, String> {
    serde_json::from_value(serde_json::Value::String(text.to_owned()))
        .map_err(|_| format!("{text:?}: expected off, on or strict"))
}

async fn chaos(args: ChaosArgs) -> Result<()> {
    let seed = jai_lab::chaos::seed_from_env(args.seed)?;
    eprintln!(
        "jai-bench: chaos seed {seed}; starting a chaos lab of {} nodes and {} etcd members in {}",
        args.nodes,
        args.etcd_members,
        args.dir.display()
    );
    let spec = LabSpec {
        etcd_members: args.etcd_members,
        bin_dir: args.bin_dir.clone(),
        chaos: true,
        ..LabSpec::new(&args.dir, args.nodes)
    };
    let mut lab = Lab::up(spec).await.context("starting the lab")?;
    let only = args
        .faults
        .as_ref()
        .map(|names| {
            names
                .iter()
                .map(|name| jai_lab::chaos::FaultKind::from_name(name))
                .collect::<Result<Vec<_>>>()
        })
        .transpose()?;
    let options = jai_lab::chaos::ChaosOptions {
        only,
        hold_min: args.hold_min,
        hold_max: args.hold_max,
        recovery_timeout: args.recovery_timeout,
        ..jai_lab::chaos::ChaosOptions::new(args.duration, seed)
    };
    let report = jai_lab::chaos::run_chaos(&mut lab, &options).await?;
    print!("{}", report.render());
    tokio::task::block_in_place(|| lab.down())?;
    anyhow::ensure!(
        report.violations.is_empty(),
        "{} invariant violation(s); seed {seed}; agent logs in {}/nodes/*/agent.log",
        report.violations.len(),
        args.dir.display()
    );
    Ok(())
}
