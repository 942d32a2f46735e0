//! Backups with pgBackRest on a real lab (its repository is `DIR/backup/repo`,
//! the stanza the cluster's name): WAL archiving across a failover, a new
//! replica restored from the repository, `jaictl backup verify` on a good and
//! on a corrupted repository, and the requests that must be refused.

mod common;

use anyhow::{anyhow, Context, Result};
use common::{jaictl, jaictl_ok, jaictl_status, lab_dir, Run, WITHIN};
use jai_lab::{wait, Lab, StopSignal};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A backup, a restore drill, or WAL reaching the archive: longer than the
/// lab's settle time (a loaded machine copies and compresses slowly).
const BACKUP_WITHIN: Duration = Duration::from_secs(240);
/// What `jaictl backup …` is told to wait at most (its default is 2 h).
const JAICTL_WAIT: &str = "4m";

/// Runs `jaictl backup create|verify …`; again while another job holds
/// the cluster's one job slot (`… is running on pg1; wait for it`): the
/// leader's schedule may take it at any moment, e.g. a full backup when the
/// repository it reads has none.
async fn backup_request(lab: &Lab, args: &[&str]) -> Result<Run> {
    wait::until(
        &format!("jaictl {args:?} to be accepted"),
        BACKUP_WITHIN,
        || async {
            let run = jaictl(lab, args)?;
            let busy = run.code == 1 && run.stderr.contains("; wait for it");
            Ok((!busy).then_some(run))
        },
    )
    .await
}

/// The lab's repository and stanza (`lab.json`'s `backup`).
fn repository(lab: &Lab) -> Result<(PathBuf, String)> {
    let backup = lab
        .desc
        .backup
        .as_ref()
        .context("the lab has no backup repository")?;
    Ok((backup.repo.clone(), backup.stanza.clone()))
}

/// Waits until the leader's first scheduled jobs are done: the full backup
/// right after bootstrap and the restore drill after it. Both must have
/// succeeded, and no job may be running (an operator's request would be
/// refused while one is).
async fn wait_first_backup_and_drill(lab: &Lab) -> Result<()> {
    let (backup, verify) = wait::until(
        "the scheduled full backup and restore drill to finish",
        BACKUP_WITHIN,
        || async {
            let status = jaictl_status(lab)?;
            let lines = &status["backup"];
            let text = |key: &str| lines[key].as_str().unwrap_or_default().to_owned();
            let (backup, verify) = (text("last_backup"), text("last_verify"));
            let done = !backup.is_empty()
                && backup != "none yet"
                && !verify.is_empty()
                && verify != "never"
                && lines["running"].is_null();
            Ok(done.then_some((backup, verify)))
        },
    )
    .await?;
    assert!(
        backup.starts_with("full ") && backup.contains(": ok in"),
        "Last backup: {backup}"
    );
    assert!(
        verify.starts_with("verify of ") && verify.contains(": ok in"),
        "Last verify: {verify}"
    );
    Ok(())
}

/// The WAL file the server at `address` writes now, e.g. `000000020000000000000007`.
async fn current_walfile(lab: &Lab, address: &str) -> Result<String> {
    let client = lab.connect_superuser(address, "postgres").await?;
    Ok(client
        .query_one("SELECT pg_walfile_name(pg_current_wal_lsn())", &[])
        .await?
        .get(0))
}

/// The database directory of the stanza's WAL archive, e.g.
/// `<repo>/archive/jai/15-1` (one PostgreSQL version in a lab).
fn archive_id_dir(repo: &Path, stanza: &str) -> Result<PathBuf> {
    let archive = repo.join("archive").join(stanza);
    let mut ids: Vec<PathBuf> = std::fs::read_dir(&archive)
        .with_context(|| format!("reading {}", archive.display()))?
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.is_dir())
        .collect();
    anyhow::ensure!(
        ids.len() == 1,
        "expected one archive id under {}, found {ids:?}",
        archive.display()
    );
    Ok(ids.remove(0))
}

/// Segments archived in `<archive id>/<bucket>` (bucket: timeline and high
/// 32 bits, e.g. `0000000200000000`), named
/// `<24 hex digits>-<sha1>.zst`.
fn archived_segments(archive_id: &Path, bucket: &str) -> Vec<String> {
    let is_segment = |name: &str| {
        let Some((segment, rest)) = name.split_once('-') else {
            return false;
        };
        let Some(sha1) = rest.strip_suffix(".zst") else {
            return false;
        };
        segment.len() == 24
            && segment.starts_with(bucket)
            && segment.chars().all(|c| c.is_ascii_hexdigit())
            && sha1.len() == 40
            && sha1.chars().all(|c| c.is_ascii_hexdigit())
    };
    std::fs::read_dir(archive_id.join(bucket))
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| is_segment(name))
        .collect()
}

/// How often `message` is in `name`'s agent log.
fn log_count(lab: &Lab, name: &str, message: &str) -> Result<usize> {
    let path = &lab.node(name)?.log;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text.matches(message).count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archiving_continues_across_a_failover_and_new_replicas_restore_from_the_repository(
) -> Result<()> {
    let dir = lab_dir()?;
    let mut lab = Lab::up(common::spec(&dir, 3, 1)).await?;
    let (repo, stanza) = repository(&lab)?;
    let old = lab.wait_healthy(WITHIN).await?;
    wait_first_backup_and_drill(&lab).await?;

    // Rows on the first timeline, on every member before the crash.
    let old_wal = current_walfile(&lab, &lab.node(&old)?.pg).await?;
    let primary = lab
        .connect_superuser(&lab.desc.haproxy.write, "postgres")
        .await?;
    primary
        .batch_execute(
            "CREATE TABLE archived (i int, note text); \
             INSERT INTO archived SELECT g, 'before' FROM generate_series(1, 1000) g",
        )
        .await?;
    drop(primary);
    for node in lab.running_nodes() {
        wait::until(&format!("the rows on {}", node.name), WITHIN, || async {
            let client = lab.connect_superuser(&node.pg, "postgres").await?;
            let rows: i64 = client
                .query_one("SELECT count(*) FROM archived", &[])
                .await?
                .get(0);
            Ok((rows == 1000).then_some(()))
        })
        .await?;
    }

    // The primary dies with its PostgreSQL; a replica takes over on a new
    // timeline and takes writes.
    lab.stop_node(&old, StopSignal::Kill)?;
    let new = lab.wait_healthy(WITHIN).await?;
    assert_ne!(new, old);
    let new_pg = lab.node(&new)?.pg.clone();
    let writer = lab
        .connect_superuser(&lab.desc.haproxy.write, "postgres")
        .await?;
    writer
        .batch_execute("INSERT INTO archived SELECT g, 'after' FROM generate_series(1001, 2000) g")
        .await?;
    let new_wal = current_walfile(&lab, &new_pg).await?;
    let (old_timeline, new_timeline) = (&old_wal[..8], &new_wal[..8]);
    assert!(
        new_timeline > old_timeline,
        "{new} writes {new_wal}, not on a timeline after {old_wal}'s"
    );

    // The repository has the WAL of both timelines and the new timeline's
    // history file. The new primary closes its segment every few seconds
    // (after a row, so that each switch has something to close) instead of
    // waiting for archive_timeout.
    let archive_id = wait::until("the archive's database directory", WITHIN, || async {
        Ok(archive_id_dir(&repo, &stanza).ok())
    })
    .await?;
    let history = format!("{new_timeline}.history");
    let last_switch: Mutex<Option<Instant>> = Mutex::new(None);
    let (old_segments, new_segments) = wait::until(
        "WAL of both timelines and the history file in the repository",
        BACKUP_WITHIN,
        || async {
            let old_segments = archived_segments(&archive_id, &old_wal[..16]);
            let new_segments = archived_segments(&archive_id, &new_wal[..16]);
            let history_archived = std::fs::read_dir(&archive_id)?
                .flatten()
                .any(|entry| entry.file_name().to_string_lossy().starts_with(&history));
            if !old_segments.is_empty() && !new_segments.is_empty() && history_archived {
                return Ok(Some((old_segments, new_segments)));
            }
            let due = last_switch
                .lock()
                .unwrap()
                .is_none_or(|at| at.elapsed() >= Duration::from_secs(3));
            if due {
                *last_switch.lock().unwrap() = Some(Instant::now());
                writer
                    .batch_execute(
                        "INSERT INTO archived VALUES (0, 'switch'); SELECT pg_switch_wal()",
                    )
                    .await?;
            }
            Ok(None)
        },
    )
    .await?;
    println!(
        "archived: {} segments of timeline {old_timeline}, {} of {new_timeline}, and {history}",
        old_segments.len(),
        new_segments.len()
    );

    // Reinitialising the remaining replica restores it from the repository
    // (the backup was taken on the old timeline: it must follow the history
    // to the new one), and it streams from the new primary again.
    let replica = lab
        .node_names()
        .into_iter()
        .find(|name| *name != old && *name != new)
        .context("a third node")?;
    const RESTORED: &str = "replica restored from the backup repository";
    const FELL_BACK: &str = "cannot restore from the backup repository";
    let (restored_before, fell_back_before) = (
        log_count(&lab, &replica, RESTORED)?,
        log_count(&lab, &replica, FELL_BACK)?,
    );
    let run = jaictl_ok(&lab, &["reinit", &replica, "--force"])?;
    println!("{}", run.stdout.trim());
    let expected_rows: i64 = writer
        .query_one("SELECT count(*) FROM archived", &[])
        .await?
        .get(0);
    let replica_pg = lab.node(&replica)?.pg.clone();
    let outcome = wait::until(
        &format!("{replica} restored from the repository and streaming"),
        BACKUP_WITHIN,
        || async {
            if log_count(&lab, &replica, FELL_BACK)? > fell_back_before {
                return Ok(Some(Err(anyhow!(
                    "{replica} fell back to pg_basebackup; see {}",
                    lab.node(&replica)?.log.display()
                ))));
            }
            if log_count(&lab, &replica, RESTORED)? <= restored_before {
                return Ok(None);
            }
            let status = jaictl_status(&lab)?;
            let row = status["members"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|row| row["member"] == replica.as_str())
                .cloned()
                .unwrap_or_default();
            if status["leader"] != new.as_str() || row["state"] != "streaming" {
                return Ok(None);
            }
            let client = lab.connect_superuser(&replica_pg, "postgres").await?;
            let rows: i64 = client
                .query_one("SELECT count(*) FROM archived", &[])
                .await?
                .get(0);
            Ok((rows == expected_rows).then_some(Ok(row)))
        },
    )
    .await?;
    let row = outcome?;
    assert_eq!(
        row["timeline"].as_i64(),
        i64::from_str_radix(new_timeline, 16).ok(),
        "{row}"
    );
    Ok(())
}

/// The largest file of backup `label` under `pg_data/base` in the repository.
fn largest_backup_file(repo: &Path, stanza: &str, label: &str) -> Result<PathBuf> {
    fn walk(dir: &Path, best: &mut Option<(u64, PathBuf)>) -> Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                walk(&entry.path(), best)?;
            } else if best.as_ref().is_none_or(|(size, _)| meta.len() > *size) {
                *best = Some((meta.len(), entry.path()));
            }
        }
        Ok(())
    }
    let base = repo
        .join("backup")
        .join(stanza)
        .join(label)
        .join("pg_data/base");
    let mut best = None;
    walk(&base, &mut best)?;
    let (size, path) = best.with_context(|| format!("no file under {}", base.display()))?;
    anyhow::ensure!(size >= 4096, "{} has only {size} bytes", path.display());
    Ok(path)
}

/// Inverts 64 bytes in the middle of `path`, in place.
fn corrupt(path: &Path) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let middle = file.metadata()?.len() / 2;
    let mut bytes = [0u8; 64];
    file.seek(SeekFrom::Start(middle))?;
    file.read_exact(&mut bytes)?;
    for byte in &mut bytes {
        *byte = !*byte;
    }
    file.seek(SeekFrom::Start(middle))?;
    file.write_all(&bytes)?;
    file.sync_all()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_passes_on_a_good_repository_and_names_a_corrupted_file() -> Result<()> {
    let dir = lab_dir()?;
    let lab = Lab::up(common::spec(&dir, 2, 1)).await?;
    let (repo, stanza) = repository(&lab)?;
    lab.wait_healthy(WITHIN).await?;
    wait_first_backup_and_drill(&lab).await?;

    let full = backup_request(
        &lab,
        &["backup", "create", "--type", "full", "--wait", JAICTL_WAIT],
    )
    .await?;
    assert!(full.code == 0 && full.stdout.contains(": ok in"), "{full}");
    let list = jaictl_ok(&lab, &["backup", "list", "-o", "json"])?;
    let list: serde_json::Value = serde_json::from_str(&list.stdout)?;
    let label = list["backups"]
        .as_array()
        .and_then(|backups| backups.last())
        .and_then(|backup| {
            (backup["type"] == "full").then(|| backup["label"].as_str().map(str::to_owned))
        })
        .flatten()
        .with_context(|| format!("the latest backup is not a full one: {list}"))?;
    assert!(
        full.stdout.contains(&format!("full {label} ")),
        "the listed latest backup is not the one just taken: {full}"
    );

    // A good repository: pgbackrest verify and the drill pass.
    let good = backup_request(&lab, &["backup", "verify", "--wait", JAICTL_WAIT]).await?;
    assert_eq!(good.code, 0, "{good}");
    assert!(
        good.stdout.contains("pg_amcheck: no corruption found"),
        "{good}"
    );
    assert!(
        good.stdout
            .contains(&format!("restore drill: {label} restored and recovered")),
        "{good}"
    );

    // One file of that backup damaged: verify fails and names it (before
    // any drill: pgbackrest verify reads every file of every backup).
    let victim = largest_backup_file(&repo, &stanza, &label)?;
    corrupt(&victim)?;
    let named = victim
        .strip_prefix(repo.join("backup").join(&stanza))?
        .to_string_lossy()
        .into_owned();
    let bad = backup_request(&lab, &["backup", "verify", "--wait", JAICTL_WAIT]).await?;
    println!("{bad}");
    assert_eq!(bad.code, 1, "{bad}");
    let printed = bad.printed();
    assert!(
        printed.contains("pgbackrest verify found") && printed.contains(&named),
        "the failure must come from pgbackrest verify and name {named}: {bad}"
    );
    assert!(
        !printed.contains("restore drill:"),
        "no drill runs on a repository that failed verify: {bad}"
    );
    let status = jaictl_status(&lab)?;
    let last_verify = status["backup"]["last_verify"].as_str().unwrap_or_default();
    assert!(
        last_verify.contains("FAILED") && last_verify.contains(&named),
        "jaictl status: {last_verify}"
    );
    Ok(())
}

/// Runs `program` as PostgreSQL's account (the lab runs PostgreSQL as
/// `postgres` when it runs as root).
fn run_as_postgres(program: &Path, args: &[&str], cwd: &Path) -> Result<()> {
    let account = nix::unistd::User::from_name("postgres")?.context("no OS user postgres")?;
    let output = std::process::Command::new(program)
        .args(args)
        .current_dir(cwd)
        .env("LC_ALL", "C")
        .uid(account.uid.as_raw())
        .gid(account.gid.as_raw())
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("running {}", program.display()))?;
    anyhow::ensure!(
        output.status.success(),
        "{} {args:?}: {}\n{}",
        program.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// A repository at `dir/repo` whose stanza `stanza` belongs to another
/// database system: a throwaway `initdb` in `dir/data`, and
/// `stanza-create --no-online` against it (no server needed).
fn foreign_repository(dir: &Path, bin_dir: &Path, stanza: &str) -> Result<PathBuf> {
    let account = nix::unistd::User::from_name("postgres")?.context("no OS user postgres")?;
    let (data, repo, lock) = (dir.join("data"), dir.join("repo"), dir.join("lock"));
    for sub in [dir, repo.as_path(), lock.as_path()] {
        std::fs::create_dir_all(sub)?;
        nix::unistd::chown(sub, Some(account.uid), Some(account.gid))?;
    }
    let data_arg = data.to_string_lossy();
    run_as_postgres(
        &bin_dir.join("initdb"),
        &[
            "-D",
            &data_arg,
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        ],
        dir,
    )?;
    run_as_postgres(
        Path::new("pgbackrest"),
        &[
            "--no-config",
            &format!("--stanza={stanza}"),
            &format!("--pg1-path={data_arg}"),
            &format!("--repo1-path={}", repo.display()),
            &format!("--lock-path={}", lock.display()),
            "--log-level-file=off",
            "--log-level-console=warn",
            "--no-online",
            "stanza-create",
        ],
        dir,
    )?;
    Ok(repo)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_backup_requests_are_refused_with_a_clear_message() -> Result<()> {
    let dir = lab_dir()?;
    let lab = Lab::up(common::spec(&dir, 1, 1)).await?;
    let (_, stanza) = repository(&lab)?;
    lab.wait_healthy(WITHIN).await?;
    wait_first_backup_and_drill(&lab).await?;

    // Not a backup type: a usage error, nothing recorded.
    let weekly = jaictl(&lab, &["backup", "create", "--type", "weekly"])?;
    assert_eq!(weekly.code, 2, "{weekly}");
    assert!(
        weekly.stderr.contains("'weekly'") && weekly.stderr.contains("full, diff, incr"),
        "{weekly}"
    );
    assert!(jaictl_status(&lab)?["backup"]["running"].is_null());

    // A repository that does not exist: the job fails and says where it looked.
    let set = jaictl_ok(
        &lab,
        &[
            "config",
            "set",
            "backup.repo_path=/nonexistent/repo",
            "--force",
        ],
    )?;
    assert!(
        set.stdout.contains("backup.repo_path:") && set.stdout.contains("-> /nonexistent/repo"),
        "{set}"
    );
    let missing = backup_request(
        &lab,
        &["backup", "create", "--type", "full", "--wait", JAICTL_WAIT],
    )
    .await?;
    assert_eq!(missing.code, 1, "{missing}");
    assert!(
        missing
            .stderr
            .contains("the repository /nonexistent/repo does not exist"),
        "{missing}"
    );

    // A repository whose stanza belongs to another database system:
    // pgBackRest refuses it, and the message says so with both system ids.
    let system_id = jaictl_status(&lab)?["system_id"]
        .as_str()
        .context("no system id")?
        .to_owned();
    let bin_dir: String = lab
        .connect_superuser(&lab.node(&lab.node_names()[0])?.pg, "postgres")
        .await?
        .query_one("SELECT setting FROM pg_config WHERE name = 'BINDIR'", &[])
        .await?
        .get(0);
    let foreign = tokio::task::block_in_place(|| {
        foreign_repository(&dir.path().join("foreign"), Path::new(&bin_dir), &stanza)
    })?;
    jaictl_ok(
        &lab,
        &[
            "config",
            "set",
            &format!("backup.repo_path={}", foreign.display()),
            "--force",
        ],
    )?;
    let mismatch = backup_request(
        &lab,
        &["backup", "create", "--type", "full", "--wait", JAICTL_WAIT],
    )
    .await?;
    assert_eq!(mismatch.code, 1, "{mismatch}");
    assert!(
        mismatch.stderr.contains("do not match stanza")
            && mismatch.stderr.contains(&format!("system-id {system_id}")),
        "{mismatch}"
    );
    Ok(())
}

/// The PID of the `pgbackrest … backup` process of `node`, if one runs.
fn pgbackrest_backup_pid(lab: &Lab, node: &str) -> Result<Option<i32>> {
    let config = lab.node(node)?.state_dir().join("pgbackrest.conf");
    let config = format!("--config={}", config.display());
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let words: Vec<String> = cmdline
            .split(|byte| *byte == 0)
            .map(|word| String::from_utf8_lossy(word).into_owned())
            .collect();
        let is_backup = words
            .first()
            .is_some_and(|program| program.ends_with("pgbackrest"))
            && words.iter().any(|word| word == &config)
            && words.iter().any(|word| word == "backup");
        if is_backup {
            return Ok(Some(pid));
        }
    }
    Ok(None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_in_the_middle_of_a_backup_records_nothing_half_done_and_the_next_one_runs(
) -> Result<()> {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let dir = lab_dir()?;
    let mut lab = Lab::up(common::spec(&dir, 2, 1)).await?;
    let leader = lab.wait_healthy(WITHIN).await?;
    wait_first_backup_and_drill(&lab).await?;
    let labels = |lab: &Lab| -> Result<Vec<String>> {
        let list: serde_json::Value =
            serde_json::from_str(&jaictl_ok(lab, &["backup", "list", "-o", "json"])?.stdout)?;
        Ok(list["backups"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|backup| backup["label"].as_str().map(str::to_owned))
            .collect())
    };
    let before = labels(&lab)?;

    // Start a backup and hold its pgBackRest still, so the failover lands
    // in its middle whatever the machine's speed.
    let mut request = lab.jaictl(&["backup", "create", "--type", "full", "--wait", JAICTL_WAIT])?;
    let request = request
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let (runner, pid) = wait::until("pgbackrest backup running", BACKUP_WITHIN, || async {
        for node in lab.node_names() {
            if let Some(pid) = pgbackrest_backup_pid(&lab, &node)? {
                return Ok(Some((node, pid)));
            }
        }
        Ok(None)
    })
    .await?;
    kill(Pid::from_raw(pid), Signal::SIGSTOP)?;
    lab.stop_node(&leader, StopSignal::Kill)?;
    let survivor = lab
        .node_names()
        .into_iter()
        .find(|name| name != &leader)
        .context("a second node")?;
    wait::until("the survivor leads", WITHIN, || async {
        let status = jaictl_status(&lab)?;
        Ok(common::running_leader(&status).filter(|name| name == &survivor))
    })
    .await?;
    let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);

    // The interrupted job ends as failed (its runner's error, or abandoned
    // by the new leader when the runner died with the old one).
    let output = tokio::task::block_in_place(|| request.wait_with_output())?;
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        output.status.code(),
        Some(1),
        "backup on {runner}: {printed}"
    );
    assert!(printed.contains("failed"), "{printed}");
    let after = labels(&lab)?;
    assert!(
        before.iter().all(|label| after.contains(label)),
        "{before:?} -> {after:?}"
    );

    // The next one runs, on the new leader, and what the repository lists
    // restores: nothing half-done was recorded.
    let next = backup_request(
        &lab,
        &["backup", "create", "--type", "full", "--wait", JAICTL_WAIT],
    )
    .await?;
    assert_eq!(next.code, 0, "{next}");
    assert!(next.stdout.contains(&format!("on {survivor}")), "{next}");
    let verify = backup_request(&lab, &["backup", "verify", "--wait", JAICTL_WAIT]).await?;
    assert_eq!(verify.code, 0, "{verify}");
    Ok(())
}
