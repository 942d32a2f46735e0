//! `jai-bench-app`: the voting app's throughput on a lab (docs/benchmarks.md).
//!
//! wrk (Debian) drives the app through HAProxy's HTTP frontend: page views
//! of one poll, and vote submissions (each with its own voter cookie, CSRF
//! token and idempotency key). pgbench runs the same vote SQL
//! (`SELECT jai_vote(...)`, prepared) straight on the primary with as many
//! clients as wrk has connections (`--vote-connections` may give the vote
//! load more). After an unmeasured warm-up of each load, the three
//! loads run in turn for `--rounds` rounds, so that both sides of the ratio
//! see the same machine state (autovacuum, checkpoints, table growth); the
//! vote path's ratio is the median of the rounds' own ratios. Each CPU layout
//! of `--layouts` is measured in turn: `shared` (as the lab runs) and
//! `partitioned` (the primary's PostgreSQL on cores of its own, see
//! `jai_lab::cpus`). Nothing here passes or fails.

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, ValueEnum as _};
use jai_lab::lab_app::{admin_password, AppClient, AppInfo, AppSpec};
use jai_lab::{cpus, process, Lab, LabSpec};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// App throughput through HAProxy beside pgbench of the same SQL.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Lab directory (a new lab is started there and stopped at the end).
    #[arg(long, default_value = "/tmp/jai-bench-app")]
    dir: PathBuf,
    /// Seconds of each measurement.
    #[arg(long, default_value_t = 10)]
    seconds: u32,
    /// Concurrent connections (wrk) and clients (pgbench).
    #[arg(long, default_value_t = 32)]
    connections: u32,
    /// wrk connections of the vote load when it should differ from
    /// --connections (voters outnumber database connections in production).
    #[arg(long)]
    vote_connections: Option<u32>,
    /// Distinct voters the vote load cycles through.
    #[arg(long, default_value_t = 400)]
    voters: usize,
    /// Measured rounds of (page views, votes, pgbench).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=20))]
    rounds: u32,
    /// Seconds of the unmeasured warm-up of each load.
    #[arg(long, default_value_t = 3)]
    warmup: u32,
    /// CPU layouts to measure in, in order (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Layout::Shared, Layout::Partitioned])]
    layouts: Vec<Layout>,
}

/// What one load run measured.
#[derive(Debug, Default, Clone)]
struct Measured {
    rate: f64,
    p50: String,
    p99: String,
    failed: u64,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    for tool in ["wrk", "pgbench"] {
        if Command::new(tool).arg("--version").output().is_err() {
            bail!("{tool} not found: run `make setup` (scripts/setup.sh installs it)");
        }
    }
    let spec = LabSpec {
        app: Some(AppSpec {
            votes_per_voter_per_minute: 1_000_000,
            ..AppSpec::default()
        }),
        ..LabSpec::new(&args.dir, 2)
    };
    eprintln!("starting a lab in {} …", args.dir.display());
    let lab = Lab::up(spec).await?;
    let app = lab
        .desc
        .app
        .clone()
        .ok_or_else(|| anyhow!("lab without app"))?;
    let mut admin = AppClient::new()?;
    admin
        .admin_login(&app.admin_url, &app.admin_user, &admin_password(&app)?)
        .await?;
    let options = ["Mountains", "Sea", "City", "Forest"];
    let poll = admin
        .create_poll(&app.admin_url, "Benchmark poll", &options, true)
        .await?;
    let work = args.dir.join("bench-app");
    std::fs::create_dir_all(&work)?;

    eprintln!("collecting {} voters …", args.voters);
    let (script, option_ids) = vote_script(&app, poll, args.voters, &work).await?;
    let (primary_name, primary) = primary_address(&lab).await?;
    let workload = Workload {
        page_url: format!("{}/polls/{poll}", app.url),
        vote_url: app.url.clone(),
        script,
        primary,
        sql: pgbench_script(&args, poll, &option_ids, &work)?,
    };

    let mut results = Vec::new();
    for (index, layout) in args.layouts.iter().enumerate() {
        let run_base = 100 * u32::try_from(index)?;
        let rounds = match layout {
            Layout::Shared => measure(&lab, &args, &workload, "shared cores", run_base)?,
            Layout::Partitioned => {
                let everything = cpus::available()?;
                let Some(partition) = cpus::Partition::halves(&everything) else {
                    eprintln!("partitioned: skipped, this machine has one core");
                    continue;
                };
                let postmaster = process::postmaster_pid(&lab.node(&primary_name)?.data_dir)
                    .ok_or_else(|| anyhow!("{primary_name}: PostgreSQL is not running"))?;
                let roots = lab_roots(&lab);
                cpus::pin_trees(&roots, &partition.rest)?;
                cpus::pin_trees(&[postmaster], &partition.database)?;
                eprintln!(
                    "partitioned: {primary_name}'s PostgreSQL on CPUs {:?}, everything else on {:?}",
                    partition.database, partition.rest
                );
                let rounds = measure(&lab, &args, &workload, "partitioned cores", run_base);
                cpus::pin_trees(&roots, &everything)?;
                cpus::pin_trees(&[postmaster], &everything)?;
                rounds?
            }
        };
        results.push((*layout, rounds));
    }
    print!("{}", report(&args, &results));
    Ok(())
}

/// Where the CPU goes during a measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Layout {
    /// Every process on every core, as the lab runs.
    Shared,
    /// The primary's PostgreSQL on half of the cores, everything else
    /// (wrk, pgbench, HAProxy, the app, the replica, etcd, agents) on the
    /// other half: the founding document's separate database server.
    Partitioned,
}

impl Layout {
    fn describe(self) -> &'static str {
        match self {
            Layout::Shared => "shared cores: every process on every core",
            Layout::Partitioned => {
                "partitioned cores: the primary's PostgreSQL on half of the cores, everything else on the other half"
            }
        }
    }
}

/// What the three loads send, prepared once per lab.
struct Workload {
    page_url: String,
    vote_url: String,
    script: PathBuf,
    primary: String,
    sql: PathBuf,
}

/// The processes the lab started (with their descendants: PostgreSQL under
/// each agent) and this benchmark itself, whose children are wrk and pgbench.
fn lab_roots(lab: &Lab) -> Vec<i32> {
    let desc = &lab.desc;
    let mut roots: Vec<i32> = desc
        .etcd_members
        .iter()
        .filter_map(|member| member.pid)
        .collect();
    roots.extend(desc.haproxy.pid);
    roots.extend(desc.nodes.iter().filter_map(|node| node.agent_pid));
    if let Some(app) = &desc.app {
        roots.extend(app.instances.iter().filter_map(|instance| instance.pid));
    }
    roots.push(std::process::id() as i32);
    roots
}

/// An unmeasured warm-up, then `--rounds` rounds of page views, votes and
/// pgbench in turn. `run_base` keeps idempotency keys apart between layouts.
fn measure(
    lab: &Lab,
    args: &Args,
    load: &Workload,
    label: &str,
    run_base: u32,
) -> Result<Vec<Round>> {
    let mut rounds = Vec::new();
    for round in 0..=args.rounds {
        let seconds = if round == 0 {
            args.warmup
        } else {
            args.seconds
        };
        let stage = if round == 0 {
            format!("{label}, warm-up")
        } else {
            format!("{label}, round {round}/{}", args.rounds)
        };
        eprintln!("{stage}: page views (wrk on {}) …", load.page_url);
        let views = wrk(args.connections, seconds, &load.page_url, None)?;
        eprintln!("{stage}: votes (wrk posting to {}) …", load.vote_url);
        let votes = wrk(
            args.vote_connections.unwrap_or(args.connections),
            seconds,
            &load.vote_url,
            Some((&load.script, run_base + round)),
        )?;
        eprintln!(
            "{stage}: pgbench, the same SQL on the primary {} …",
            load.primary
        );
        let raw = pgbench(lab, &load.primary, args, seconds, &load.sql)?;
        if round > 0 {
            eprintln!(
                "{stage}: views {:.0}/s, votes {:.0}/s, pgbench {:.0}/s",
                views.rate, votes.rate, raw.rate
            );
            rounds.push(Round { views, votes, raw });
        }
    }
    Ok(rounds)
}

/// One measured round of the three loads.
struct Round {
    views: Measured,
    votes: Measured,
    raw: Measured,
}

/// Runs wrk with `--latency` and reads rate, p50, p99 and failures. A script
/// gets `run` as its argument: each run's idempotency keys are its own, so
/// no run replays an earlier one's votes (a replay costs the database less).
fn wrk(
    connections: u32,
    seconds: u32,
    url: &str,
    script: Option<(&Path, u32)>,
) -> Result<Measured> {
    let mut command = Command::new("wrk");
    command
        .arg("-t2")
        .arg(format!("-c{connections}"))
        .arg(format!("-d{seconds}s"))
        .arg("--timeout")
        .arg("20s")
        .arg("--latency");
    match script {
        Some((script, run)) => command
            .arg("-s")
            .arg(script)
            .arg(url)
            .arg("--")
            .arg(run.to_string()),
        None => command.arg(url),
    };
    let output = command.output().context("running wrk")?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        bail!(
            "wrk failed: {text}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let number_after = |label: &str| {
        text.lines()
            .find_map(|line| line.trim().strip_prefix(label))
            .map(|rest| rest.trim().to_owned())
    };
    let rate = number_after("Requests/sec:")
        .and_then(|rate| rate.parse().ok())
        .ok_or_else(|| anyhow!("no Requests/sec in wrk's output:\n{text}"))?;
    let failed = number_after("Non-2xx or 3xx responses:")
        .and_then(|count| count.parse().ok())
        .unwrap_or(0)
        + number_after("Socket errors:")
            .map(|errors| {
                errors
                    .split(',')
                    .filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok())
                    .sum()
            })
            .unwrap_or(0);
    Ok(Measured {
        rate,
        p50: number_after("50%").unwrap_or_default(),
        p99: number_after("99%").unwrap_or_default(),
        failed,
    })
}

/// Opens the poll page as `voters` new visitors and writes a wrk script that
/// posts votes as them, each with a fresh idempotency key.
async fn vote_script(
    app: &AppInfo,
    poll: i64,
    voters: usize,
    work: &Path,
) -> Result<(PathBuf, Vec<i64>)> {
    let mut entries = String::new();
    let mut option_ids = Vec::new();
    for _ in 0..voters {
        let mut visitor = AppClient::new()?;
        let page = visitor
            .get_ok(
                &format!("{}/polls/{poll}", app.url),
                std::time::Duration::from_secs(30),
            )
            .await?;
        let cookie = visitor
            .cookies
            .get("jai_voter")
            .ok_or_else(|| anyhow!("no voter cookie"))?;
        let csrf = page.field("csrf").ok_or_else(|| anyhow!("no csrf field"))?;
        let _ = writeln!(entries, "  {{\"jai_voter={cookie}\", \"{csrf}\"}},");
        option_ids = page
            .radio_values("option")
            .iter()
            .filter_map(|id| id.parse().ok())
            .collect();
    }
    let options = option_ids
        .iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let script = format!(
        "-- Written by jai-bench-app: votes as pre-registered voters.\n\
         local voters = {{\n{entries}}}\n\
         local options = {{ {options} }}\n\
         local threads = 0\n\
         function setup(thread) threads = threads + 1; thread:set(\"id\", threads) end\n\
         local counter = 0\n\
         local run = 0\n\
         function init(args) run = tonumber(args[1]) or 0; math.randomseed(run * 7919 + id) end\n\
         function request()\n\
         \x20 counter = counter + 1\n\
         \x20 local voter = voters[math.random(#voters)]\n\
         \x20 local body = \"csrf=\" .. voter[2] .. \"&key=\" .. string.format(\"wrk-%d-%d-%012d\", run, id, counter) ..\n\
         \x20   \"&option=\" .. options[math.random(#options)]\n\
         \x20 return wrk.format(\"POST\", \"/polls/{poll}/vote\",\n\
         \x20   {{[\"Content-Type\"] = \"application/x-www-form-urlencoded\", [\"Cookie\"] = voter[1]}}, body)\n\
         end\n"
    );
    let file = work.join("votes.lua");
    std::fs::write(&file, script)?;
    Ok((file, option_ids))
}

/// Writes pgbench's script: the vote SQL with a random voter (of as many as
/// the app load has), a fresh key and a random option of the poll.
fn pgbench_script(args: &Args, poll: i64, options: &[i64], work: &Path) -> Result<PathBuf> {
    let (first, last) = match (options.iter().min(), options.iter().max()) {
        (Some(first), Some(last)) => (*first, *last),
        _ => bail!("the poll has no options"),
    };
    let script = work.join("votes.sql");
    std::fs::write(
        &script,
        format!(
            "\\set voter random(1, {voters})\n\
             \\set option random({first}, {last})\n\
             \\set key random(1, 1000000000000)\n\
             SELECT jai_vote('pgbench-voter-' || :voter, 'pgbench-' || :client_id || '-' || :key, {poll}, :option);\n",
            voters = args.voters,
        ),
    )?;
    Ok(script)
}

/// pgbench of the vote SQL on the primary, prepared, same client count.
fn pgbench(lab: &Lab, primary: &str, args: &Args, seconds: u32, script: &Path) -> Result<Measured> {
    let (host, port) = primary
        .rsplit_once(':')
        .ok_or_else(|| anyhow!("bad address {primary}"))?;
    let access = &lab.desc.postgres;
    let output = Command::new("pgbench")
        .args(["-n", "-M", "prepared", "-j", "2"])
        .arg(format!("-c{}", args.connections))
        .arg(format!("-T{seconds}"))
        .arg("-f")
        .arg(script)
        .args(["-h", host, "-p", port, "-U", &access.user, &access.database])
        // The password goes through the environment, never the command line.
        .env("PGPASSWORD", access.password()?)
        .output()
        .context("running pgbench")?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        bail!(
            "pgbench failed: {text}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let value_after = |label: &str| {
        text.lines()
            .find_map(|line| line.trim().strip_prefix(label))
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_owned)
    };
    let rate = value_after("tps =")
        .and_then(|tps| tps.parse().ok())
        .ok_or_else(|| anyhow!("no tps in pgbench's output:\n{text}"))?;
    let failed = value_after("number of failed transactions:")
        .and_then(|count| count.parse().ok())
        .unwrap_or(0);
    Ok(Measured {
        rate,
        p50: value_after("latency average =")
            .map(|ms| format!("{ms}ms avg"))
            .unwrap_or_default(),
        p99: String::new(),
        failed,
    })
}

/// The node HAProxy's write port reaches: its name and the `HOST:PORT` of
/// its PostgreSQL.
async fn primary_address(lab: &Lab) -> Result<(String, String)> {
    let name = lab
        .healthy_primary()
        .await?
        .ok_or_else(|| anyhow!("no primary behind HAProxy's write port"))?;
    let address = lab.node(&name)?.pg.clone();
    Ok((name, address))
}

/// The median of `values` (the upper middle for an even count).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn ratio(part: f64, whole: f64) -> f64 {
    if whole > 0.0 {
        part / whole * 100.0
    } else {
        0.0
    }
}

fn report(args: &Args, results: &[(Layout, Vec<Round>)]) -> String {
    let mut text = format!(
        "\njai-app through HAProxy (2 app instances, {c} connections, {v} for votes) vs pgbench on the primary ({c} clients): \
         {n} rounds of {s} s per load after a {w} s warm-up, per CPU layout\n",
        c = args.connections,
        v = args.vote_connections.unwrap_or(args.connections),
        n = args.rounds,
        s = args.seconds,
        w = args.warmup,
    );
    let mut summary = String::new();
    for (layout, rounds) in results {
        let _ = writeln!(text, "\n{}", layout.describe());
        let _ = writeln!(
            text,
            "{:<6} {:<34} {:>10} {:>12} {:>12} {:>8}",
            "round", "load", "per second", "p50", "p99", "failed"
        );
        for (index, round) in rounds.iter().enumerate() {
            for (label, measured) in [
                ("page views (wrk GET /polls/ID)", &round.views),
                ("votes (wrk POST /polls/ID/vote)", &round.votes),
                ("vote SQL (pgbench, prepared)", &round.raw),
            ] {
                let _ = writeln!(
                    text,
                    "{:<6} {:<34} {:>10.0} {:>12} {:>12} {:>8}",
                    index + 1,
                    label,
                    measured.rate,
                    measured.p50,
                    measured.p99,
                    measured.failed
                );
            }
            let _ = writeln!(
                text,
                "{:<6} vote path / raw SQL: {:.0}%",
                index + 1,
                ratio(round.votes.rate, round.raw.rate)
            );
        }
        let views = median(rounds.iter().map(|round| round.views.rate).collect());
        let votes = median(rounds.iter().map(|round| round.votes.rate).collect());
        let raw = median(rounds.iter().map(|round| round.raw.rate).collect());
        let paired = median(
            rounds
                .iter()
                .map(|round| ratio(round.votes.rate, round.raw.rate))
                .collect(),
        );
        let failed: u64 = rounds
            .iter()
            .map(|round| round.views.failed + round.votes.failed + round.raw.failed)
            .sum();
        let name = layout
            .to_possible_value()
            .map(|value| value.get_name().to_owned())
            .unwrap_or_default();
        let _ = writeln!(
            summary,
            "{name:<12} page views {views:>6.0}/s   votes {votes:>5.0}/s   vote SQL {raw:>5.0}/s   \
             vote path / raw SQL {paired:>3.0}% (of the median rates: {:.0}%)   failed {failed}",
            ratio(votes, raw)
        );
    }
    let _ = write!(
        text,
        "\nmedians of the rounds (the vote path's ratio: the median of each round's ratio, \
         votes and pgbench measured back to back):\n{summary}\
         (targets: page views >= 5000/s, vote path >= 70% of pgbench)\n"
    );
    text
}
