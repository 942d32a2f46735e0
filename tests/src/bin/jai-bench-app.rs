//! `jai-bench-app`: the voting app's throughput on a lab (docs/benchmarks.md).
//!
//! wrk (Debian) drives the app through HAProxy's HTTP frontend: page views
//! of one poll, then vote submissions (each with its own voter cookie, CSRF
//! token and idempotency key). pgbench then runs the same vote SQL
//! (`SELECT jai_vote(...)`, prepared) straight on the primary with the same
//! number of clients. The numbers are printed side by side with the ratio;
//! nothing here passes or fails.

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use jai_lab::lab_app::{admin_password, AppClient, AppInfo, AppSpec};
use jai_lab::{Lab, LabSpec};
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
    /// Distinct voters the vote load cycles through.
    #[arg(long, default_value_t = 400)]
    voters: usize,
}

/// What one load run measured.
#[derive(Debug, Default)]
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

    let page_url = format!("{}/polls/{poll}", app.url);
    eprintln!("page views: wrk on {page_url} …");
    let views = wrk(&args, &page_url, None)?;

    eprintln!("collecting {} voters …", args.voters);
    let (script, option_ids) = vote_script(&app, poll, args.voters, &work).await?;
    eprintln!("votes: wrk posting to {}/polls/{poll}/vote …", app.url);
    let votes = wrk(&args, &app.url, Some(&script))?;

    eprintln!("pgbench: the same SQL on the primary …");
    let primary = primary_address(&lab).await?;
    let raw = pgbench(&lab, &primary, &args, poll, &option_ids, &work)?;

    print!("{}", report(&args, &views, &votes, &raw));
    Ok(())
}

/// Runs wrk with `--latency` and reads rate, p50, p99 and failures.
fn wrk(args: &Args, url: &str, script: Option<&Path>) -> Result<Measured> {
    let mut command = Command::new("wrk");
    command
        .arg("-t2")
        .arg(format!("-c{}", args.connections))
        .arg(format!("-d{}s", args.seconds))
        .arg("--timeout")
        .arg("20s")
        .arg("--latency");
    if let Some(script) = script {
        command.arg("-s").arg(script);
    }
    let output = command.arg(url).output().context("running wrk")?;
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
         function init(args) math.randomseed(id * 7919) end\n\
         function request()\n\
         \x20 counter = counter + 1\n\
         \x20 local voter = voters[math.random(#voters)]\n\
         \x20 local body = \"csrf=\" .. voter[2] .. \"&key=\" .. string.format(\"wrk-%d-%012d\", id, counter) ..\n\
         \x20   \"&option=\" .. options[math.random(#options)]\n\
         \x20 return wrk.format(\"POST\", \"/polls/{poll}/vote\",\n\
         \x20   {{[\"Content-Type\"] = \"application/x-www-form-urlencoded\", [\"Cookie\"] = voter[1]}}, body)\n\
         end\n"
    );
    let file = work.join("votes.lua");
    std::fs::write(&file, script)?;
    Ok((file, option_ids))
}

/// pgbench of the vote SQL on the primary, prepared, same client count.
fn pgbench(
    lab: &Lab,
    primary: &str,
    args: &Args,
    poll: i64,
    options: &[i64],
    work: &Path,
) -> Result<Measured> {
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
    let (host, port) = primary
        .rsplit_once(':')
        .ok_or_else(|| anyhow!("bad address {primary}"))?;
    let access = &lab.desc.postgres;
    let output = Command::new("pgbench")
        .args(["-n", "-M", "prepared", "-j", "2"])
        .arg(format!("-c{}", args.connections))
        .arg(format!("-T{}", args.seconds))
        .arg("-f")
        .arg(&script)
        .args(["-h", host, "-p", port, "-U", &access.user, &access.database])
        // The password goes through the environment, never the command line.
        .env("PGPASSWORD", &access.password)
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

/// The node HAProxy's write port reaches, as `HOST:PORT` of its PostgreSQL.
async fn primary_address(lab: &Lab) -> Result<String> {
    let name = lab
        .healthy_primary()
        .await?
        .ok_or_else(|| anyhow!("no primary behind HAProxy's write port"))?;
    Ok(lab.node(&name)?.pg.clone())
}

fn report(args: &Args, views: &Measured, votes: &Measured, raw: &Measured) -> String {
    let mut text = format!(
        "\njai-app through HAProxy (2 app instances, {c} connections, {s} s each) vs pgbench on the primary ({c} clients)\n",
        c = args.connections,
        s = args.seconds
    );
    let _ = writeln!(
        text,
        "{:<34} {:>10} {:>12} {:>12} {:>8}",
        "load", "per second", "p50", "p99", "failed"
    );
    for (label, measured) in [
        ("page views (wrk GET /polls/ID)", views),
        ("votes (wrk POST /polls/ID/vote)", votes),
        ("vote SQL (pgbench, prepared)", raw),
    ] {
        let _ = writeln!(
            text,
            "{:<34} {:>10.0} {:>12} {:>12} {:>8}",
            label, measured.rate, measured.p50, measured.p99, measured.failed
        );
    }
    let ratio = if raw.rate > 0.0 {
        votes.rate / raw.rate * 100.0
    } else {
        0.0
    };
    let _ = writeln!(
        text,
        "vote path / raw SQL: {ratio:.0}%   (targets: page views >= 5000/s, vote path >= 70% of pgbench)"
    );
    text
}
