//! The restore drill: the latest backup restored into a scratch directory,
//! a throwaway PostgreSQL recovered on it to the end of the archive, checked,
//! counted, and removed.
//!
//! A backup is worth what its restore is worth, so the drill does what an
//! operator's restore would do, with the same pgBackRest, the same archive
//! and the same binaries. The throwaway server listens on its own Unix
//! socket only (`listen_addresses = ''`, a free port number names the socket
//! file), archives nothing and never joins the cluster.

use super::pgbackrest::PgBackRest;
use crate::postgres::RunAs;
use anyhow::{anyhow, bail, Context, Result};
use jai_proto::DrillReport;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::Command;

/// What the drill needs besides pgBackRest.
#[derive(Debug, Clone)]
pub struct DrillEnv {
    /// PostgreSQL's programs (`postgres`, `pg_amcheck`).
    pub bin_dir: PathBuf,
    /// The scratch directory (created, then removed).
    pub scratch: PathBuf,
    /// The superuser and its password (the restored copy has the cluster's roles).
    pub superuser: String,
    /// Its password.
    pub password: String,
    /// The passfile (for `pg_amcheck`).
    pub passfile: PathBuf,
    /// PostgreSQL's account.
    pub run_as: Option<RunAs>,
    /// The longest the whole drill may take.
    pub timeout: Duration,
    /// The stanza's WAL archive in the repository (`<repo>/archive/<stanza>`).
    pub archive_dir: PathBuf,
}

/// Seconds since the newest WAL file reached the archive: what a restore
/// started now would lose at most (the RPO), a quiet primary switching
/// segments at least every `archive_timeout`.
pub fn newest_archived_wal_age(archive_dir: &Path) -> Option<f64> {
    let mut newest = None;
    // <archive>/<version-id>/<timeline+high 32 bits>/<segment>-<sha1>.<ext>
    for version in std::fs::read_dir(archive_dir).ok()?.flatten() {
        for bucket in std::fs::read_dir(version.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            for file in std::fs::read_dir(bucket.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                if file.file_name().len() < 24 {
                    continue;
                }
                if let Ok(modified) = file.metadata().and_then(|meta| meta.modified()) {
                    newest = newest.max(Some(modified));
                }
            }
        }
    }
    Some(newest?.elapsed().unwrap_or_default().as_secs_f64())
}

/// Tables counted per database, at most: a drill reports, it does not audit.
const MAX_TABLES: usize = 200;

/// Runs the drill on the latest backup; the scratch directory is gone afterwards
/// whatever happened.
pub async fn run(pgbackrest: &PgBackRest, env: &DrillEnv) -> Result<DrillReport> {
    let archive_age = newest_archived_wal_age(&env.archive_dir);
    let result = tokio::time::timeout(env.timeout, drill(pgbackrest, env, archive_age))
        .await
        .unwrap_or_else(|_| {
            Err(anyhow!(
                "the drill did not finish within {}",
                humantime::format_duration(env.timeout)
            ))
        });
    if let Err(error) = remove_scratch(&env.scratch) {
        tracing::warn!("drill: cannot remove {}: {error:#}", env.scratch.display());
    }
    result
}

async fn drill(
    pgbackrest: &PgBackRest,
    env: &DrillEnv,
    archive_age: Option<f64>,
) -> Result<DrillReport> {
    let info = pgbackrest.info().await?;
    let latest = info
        .latest()
        .ok_or_else(|| anyhow!("the repository holds no backup to restore"))?
        .label
        .clone();
    remove_scratch(&env.scratch)?;
    let data = env.scratch.join("data");
    let socket = env.scratch.join("run");
    for dir in [&env.scratch, &data, &socket] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        if let Some(run_as) = env.run_as {
            run_as.chown(dir)?;
        }
    }
    let begun = Instant::now();
    pgbackrest
        .restore(
            &data,
            Some(&latest),
            &["--type=default", "--archive-mode=off"],
            env.timeout,
        )
        .await?;
    let _ = std::fs::remove_file(data.join("standby.signal"));
    let port = free_port()?;
    let log = env.scratch.join("postgresql.log");
    let mut server = start(env, &data, &socket, port, &log, pgbackrest)?;
    let outcome = async {
        let examined = examine(env, &socket, port, &mut server, begun).await?;
        let checked = amcheck(env, &socket, port).await?;
        Ok::<_, anyhow::Error>((examined, checked))
    }
    .await;
    stop(&mut server).await;
    let ((restore_seconds, rows), amcheck) = outcome?;
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    let (end_lsn, end_time) = recovery_end(&log_text);
    Ok(DrillReport {
        label: latest,
        restore_seconds,
        end_lsn,
        end_time,
        rpo_seconds: archive_age,
        rows,
        amcheck,
    })
}

fn remove_scratch(scratch: &Path) -> Result<()> {
    match std::fs::remove_dir_all(scratch) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
            Err(error).with_context(|| format!("removing {}", scratch.display()))
        }
        _ => Ok(()),
    }
}

/// A port number no one listens on now (it only names the socket file).
fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

fn start(
    env: &DrillEnv,
    data: &Path,
    socket: &Path,
    port: u16,
    log: &Path,
    pgbackrest: &PgBackRest,
) -> Result<tokio::process::Child> {
    let log = std::fs::File::create(log).context("creating the drill's log")?;
    let restore_command = pgbackrest.invocation.restore_command_into(data);
    let settings: [(&str, String); 13] = [
        ("port", port.to_string()),
        ("listen_addresses", String::new()),
        (
            "unix_socket_directories",
            socket.to_string_lossy().into_owned(),
        ),
        ("cluster_name", "jai-restore-drill".into()),
        ("archive_mode", "off".into()),
        ("restore_command", restore_command),
        ("primary_conninfo", String::new()),
        ("primary_slot_name", String::new()),
        ("synchronous_standby_names", String::new()),
        ("hot_standby", "on".into()),
        ("shared_buffers", "64MB".into()),
        ("log_timezone", "UTC".into()),
        ("logging_collector", "off".into()),
    ];
    let mut command = Command::new(env.bin_dir.join("postgres"));
    command.arg("-D").arg(data);
    for (name, value) in settings {
        command.arg("-c").arg(format!("{name}={value}"));
    }
    command
        .env("LC_ALL", "C")
        .current_dir(&env.scratch)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .kill_on_drop(true);
    if let Some(run_as) = env.run_as {
        run_as.apply(&mut command);
    }
    command
        .spawn()
        .context("starting PostgreSQL on the restored copy")
}

/// Waits for recovery to end, then counts every user table's rows.
async fn examine(
    env: &DrillEnv,
    socket: &Path,
    port: u16,
    server: &mut tokio::process::Child,
    begun: Instant,
) -> Result<(f64, BTreeMap<String, u64>)> {
    let client = loop {
        if let Some(status) = server.try_wait()? {
            let log =
                std::fs::read_to_string(env.scratch.join("postgresql.log")).unwrap_or_default();
            let why = log
                .lines()
                .rev()
                .find(|line| line.contains("FATAL") || line.contains("PANIC"))
                .unwrap_or("(nothing in its log)");
            bail!(
                "PostgreSQL on the restored copy exited ({status}) before it recovered: {}",
                why.trim()
            );
        }
        if let Ok(client) = connect(env, socket, port, "postgres").await {
            let recovering: bool = client
                .query_one("SELECT pg_is_in_recovery()", &[])
                .await?
                .get(0);
            if !recovering {
                break client;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let restore_seconds = begun.elapsed().as_secs_f64();
    let databases: Vec<String> = client
        .query(
            "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let mut rows = BTreeMap::new();
    for database in databases {
        let client = connect(env, socket, port, &database).await?;
        let tables = client
            .query(
                "SELECT format('%I.%I', schemaname, relname), schemaname || '.' || relname \
                 FROM pg_stat_user_tables ORDER BY 2 LIMIT $1",
                &[&(MAX_TABLES as i64)],
            )
            .await?;
        for table in tables {
            let quoted: String = table.get(0);
            let name: String = table.get(1);
            let count: i64 = client
                .query_one(&format!("SELECT count(*) FROM {quoted}"), &[])
                .await?
                .get(0);
            rows.insert(format!("{database}.{name}"), count as u64);
        }
    }
    Ok((restore_seconds, rows))
}

async fn connect(
    env: &DrillEnv,
    socket: &Path,
    port: u16,
    database: &str,
) -> Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::Config::new()
        .host_path(socket)
        .port(port)
        .user(&env.superuser)
        .password(&env.password)
        .dbname(database)
        .connect_timeout(Duration::from_secs(5))
        .connect(tokio_postgres::NoTls)
        .await?;
    tokio::spawn(connection);
    Ok(client)
}

/// `pg_amcheck` over every database (heap and B-tree indexes); the amcheck
/// extension is installed in the throwaway copy only.
async fn amcheck(env: &DrillEnv, socket: &Path, port: u16) -> Result<String> {
    let mut command = Command::new(env.bin_dir.join("pg_amcheck"));
    command
        .args(["--all", "--install-missing", "--no-password", "--jobs=2"])
        .arg(format!("--host={}", socket.display()))
        .arg(format!("--port={port}"))
        .arg(format!("--username={}", env.superuser))
        .env("PGPASSFILE", &env.passfile)
        .env("LC_ALL", "C")
        .current_dir(&env.scratch)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Some(run_as) = env.run_as {
        run_as.apply(&mut command);
    }
    let output = command.output().await.context("running pg_amcheck")?;
    if !output.status.success() {
        let printed = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        bail!(
            "pg_amcheck found a problem: {}",
            printed.lines().next().unwrap_or("(no output)")
        );
    }
    Ok("no corruption found".to_owned())
}

/// Fast shutdown, then kill after 30 s.
async fn stop(server: &mut tokio::process::Child) {
    if let Some(pid) = server.id() {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGINT);
    }
    if tokio::time::timeout(Duration::from_secs(30), server.wait())
        .await
        .is_err()
    {
        let _ = server.kill().await;
    }
}

/// Where recovery ended, from the server's log: `redo done at <lsn>` and
/// `last completed transaction was at log time <time>`.
fn recovery_end(log: &str) -> (Option<String>, Option<String>) {
    let after = |marker: &str| {
        log.lines().rev().find_map(|line| {
            let rest = &line[line.find(marker)? + marker.len()..];
            Some(rest.trim().to_owned())
        })
    };
    let end_lsn =
        after("redo done at ").and_then(|rest| rest.split_whitespace().next().map(str::to_owned));
    let end_time = after("last completed transaction was at log time ");
    (end_lsn, end_time)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_end_of_recovery_is_read_from_the_log() {
        let log = "2026-12-03 20:40:02.000 UTC [1] LOG:  redo done at 0/3000148 system usage: CPU: user: 0.00 s\n\
                   2026-12-03 20:40:02.000 UTC [1] LOG:  last completed transaction was at log time 2026-12-03 20:40:01.5+00\n";
        let (lsn, time) = recovery_end(log);
        assert_eq!(lsn.as_deref(), Some("0/3000148"));
        assert_eq!(time.as_deref(), Some("2026-12-03 20:40:01.5+00"));
    }
}
