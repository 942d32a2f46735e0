//! HAProxy follows the leader through the agents' runtime-API pushes, not only
//! through health checks: every lab here checks only every 30 s, so anything
//! faster than that is the push's doing.

mod common;

use anyhow::Result;
use common::{lab_dir, WITHIN};
use jai_lab::{wait, Lab, LabSpec, StopSignal};
use std::time::Duration;

/// Far slower than any push: checks alone cannot explain what the tests see.
const SLOW_CHECKS: Duration = Duration::from_secs(30);
/// So slow that a check almost never falls inside one test's window.
const VERY_SLOW_CHECKS: Duration = Duration::from_secs(300);
/// Longer than the leader's reconcile period (5 s), far shorter than a check.
const PUSHED_WITHIN: Duration = Duration::from_secs(10);

async fn slow_check_lab(dir: &tempfile::TempDir) -> Result<Lab> {
    Lab::up(LabSpec {
        haproxy_check_interval: SLOW_CHECKS,
        ..common::spec(dir, 3, 1)
    })
    .await
}

/// A healthy 3-node lab whose HAProxy checks every `checks`, and its leader.
async fn healthy_lab(dir: &tempfile::TempDir, checks: Duration) -> Result<(Lab, String)> {
    let lab = Lab::up(LabSpec {
        haproxy_check_interval: checks,
        ..common::spec(dir, 3, 1)
    })
    .await?;
    let primary = lab.wait_healthy(WITHIN).await?;
    Ok((lab, primary))
}

/// The member a new connection through the write port reaches, if any.
async fn write_port_reaches(lab: &Lab) -> Result<String> {
    let client = lab
        .connect_superuser(&lab.desc.haproxy.write, "postgres")
        .await?;
    let row = client
        .query_one(
            "SELECT current_setting('cluster_name'), pg_is_in_recovery()",
            &[],
        )
        .await?;
    let (name, in_recovery): (String, bool) = (row.get(0), row.get(1));
    anyhow::ensure!(!in_recovery, "the write port reached replica {name}");
    Ok(name)
}

/// Ten new connections in a row through the write port all reach `primary`.
async fn write_port_only_reaches(lab: &Lab, primary: &str) -> Result<Option<()>> {
    for _ in 0..10 {
        if write_port_reaches(lab).await? != primary {
            return Ok(None);
        }
    }
    Ok(Some(()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_write_port_follows_a_failover_without_waiting_for_checks() -> Result<()> {
    let dir = lab_dir()?;
    let mut lab = slow_check_lab(&dir).await?;
    let new = kill_the_leader_and_follow(&mut lab).await?;
    // The new primary leaves the read backend by the same push.
    wait::until(
        "the new primary out of the read backend",
        PUSHED_WITHIN,
        || async {
            let up = servers_up(&lab)?;
            Ok((up.get(&format!("jai_read/{new}")) == Some(&false)).then_some(()))
        },
    )
    .await?;
    Ok(())
}

/// SIGKILLs the leader's node and waits until a new leader is elected and the
/// write port reaches only it, faster than any check; returns the new leader.
async fn kill_the_leader_and_follow(lab: &mut Lab) -> Result<String> {
    let old = lab.wait_healthy(WITHIN).await?;
    lab.stop_node(&old, StopSignal::Kill)?;
    let new = wait::until("a new leader", WITHIN, || async {
        let primaries = lab.primaries().await;
        Ok(primaries.into_iter().find(|name| *name != old))
    })
    .await?;
    wait::until(
        "the write port to reach only the new leader",
        PUSHED_WITHIN,
        || write_port_only_reaches(lab, &new),
    )
    .await?;
    Ok(new)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_or_stale_haproxy_is_reconciled_by_the_leader() -> Result<()> {
    let dir = lab_dir()?;
    let (mut lab, primary) = healthy_lab(&dir, VERY_SLOW_CHECKS).await?;

    // HAProxy restarts (losing every runtime change), then its state goes
    // stale the worst way: the leader down, the replicas up. With checks this
    // slow, only the leader's periodic reconcile can put it right in time.
    lab.restart_haproxy()?;
    for node in &lab.desc.nodes {
        let health = if node.name == primary { "down" } else { "up" };
        let answer = lab.haproxy_command(&format!(
            "set server jai_write/{} health {health}",
            node.name
        ))?;
        anyhow::ensure!(answer.trim().is_empty(), "HAProxy: {answer}");
    }
    wait::until(
        "the write port to reach only the leader again",
        PUSHED_WITHIN,
        || write_port_only_reaches(&lab, &primary),
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_switchover_no_session_to_the_old_primary_survives() -> Result<()> {
    let dir = lab_dir()?;
    let lab = slow_check_lab(&dir).await?;
    let old = lab.wait_healthy(WITHIN).await?;
    let held = lab
        .connect_superuser(&lab.desc.haproxy.write, "postgres")
        .await?;
    let reached: String = held
        .query_one("SELECT current_setting('cluster_name')", &[])
        .await?
        .get(0);
    assert_eq!(reached, old);

    // No wait for the leader to publish its streaming standbys: a switchover
    // asked for right after the replicas started streaming is checked again
    // by the control API until the next publication shows them (up to two
    // loops) rather than refused.
    let output = tokio::task::block_in_place(|| {
        lab.jaictl(&["switchover", "--force"])?
            .output()
            .map_err(anyhow::Error::from)
    })?;
    anyhow::ensure!(
        output.status.success(),
        "jaictl switchover: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let new = wait::until("a new primary", WITHIN, || async {
        Ok(lab.primaries().await.into_iter().find(|name| *name != old))
    })
    .await?;
    wait::until(
        "the write port to reach only the new primary",
        PUSHED_WITHIN,
        || write_port_only_reaches(&lab, &new),
    )
    .await?;
    let survived = held.query_one("SELECT 1", &[]).await;
    assert!(
        survived.is_err(),
        "a session to the old primary {old} survived the switchover"
    );
    Ok(())
}

/// A stand-in HAProxy on `listener`: answers every runtime API request with
/// nothing (no servers, every command accepted) and hands over what it got.
async fn fake_haproxy(
    listener: tokio::net::TcpListener,
    received: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    while let Ok((stream, _)) = listener.accept().await {
        let mut stream = tokio::io::BufReader::new(stream);
        let mut line = String::new();
        if stream.read_line(&mut line).await.is_ok() {
            received.lock().unwrap().push(line.trim().to_owned());
        }
        let _ = stream.get_mut().shutdown().await;
    }
}

/// Messages of `node`'s agent log (written with `log.format: json`, which
/// this checks line by line) that contain `text`.
fn log_lines(lab: &Lab, node: &str, text: &str) -> Result<usize> {
    let messages = common::json_log_messages(&lab.node(node)?.log)?;
    Ok(messages
        .iter()
        .filter(|message| message.contains(text))
        .count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_haproxy_delays_no_failover_and_is_logged_once_per_outage() -> Result<()> {
    // A second HAProxy nobody answers for: its port is closed until the end.
    let down = std::net::TcpListener::bind("127.0.0.1:0")?;
    let socket = down.local_addr()?.to_string();
    drop(down);
    let dir = lab_dir()?;
    let mut lab = Lab::up(LabSpec {
        haproxy_check_interval: SLOW_CHECKS,
        haproxy_extra_sockets: vec![socket.clone()],
        agent_log_format: jai_proto::logging::LogFormat::Json,
        ..common::spec(&dir, 3, 1)
    })
    .await?;
    let new = kill_the_leader_and_follow(&mut lab).await?;

    // The missing HAProxy comes back: the leader, retrying every round,
    // reconciles it at once and says the outage is over.
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let listener = tokio::net::TcpListener::bind(&socket).await?;
    let server = tokio::spawn(fake_haproxy(listener, received.clone()));
    let up = format!("set server jai_write/{new} health up");
    wait::until(
        "the returning HAProxy to be reconciled",
        PUSHED_WITHIN,
        || async {
            Ok(received
                .lock()
                .unwrap()
                .iter()
                .any(|line| line.contains(&up))
                .then_some(()))
        },
    )
    .await?;
    let failed = format!("HAProxy push failed: {socket}");
    wait::until(
        "the end of the outage in the log",
        PUSHED_WITHIN,
        || async {
            Ok((log_lines(&lab, &new, &format!("{socket} answers again"))? == 1).then_some(()))
        },
    )
    .await?;
    // Failing at every round of the outage, logged once.
    assert_eq!(
        log_lines(&lab, &new, &failed)?,
        1,
        "{new}: one line per outage"
    );
    for node in lab.node_names() {
        assert!(
            log_lines(&lab, &node, &failed)? <= 1,
            "{node}: one line per outage"
        );
    }
    // Only now: once it is gone, the next reconcile starts a new outage.
    server.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jaictl_renders_a_valid_config_and_a_missing_member_is_added_at_runtime() -> Result<()> {
    let dir = lab_dir()?;
    let (mut lab, primary) = healthy_lab(&dir, VERY_SLOW_CHECKS).await?;

    // `jaictl haproxy-config` renders the cluster's members; HAProxy accepts it.
    let output = tokio::task::block_in_place(|| {
        lab.jaictl(&[
            "haproxy-config",
            "--write-port",
            &lab.desc.haproxy.write,
            "--read-port",
            &lab.desc.haproxy.read,
            "--stats-socket",
            &lab.desc.haproxy.stats_socket.display().to_string(),
            "--check-interval",
            "300s",
        ])?
        .output()
        .map_err(anyhow::Error::from)
    })?;
    anyhow::ensure!(
        output.status.success(),
        "jaictl haproxy-config: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rendered = String::from_utf8(output.stdout)?;
    for node in &lab.desc.nodes {
        let line = format!("server {} {} check", node.name, node.pg);
        assert_eq!(rendered.matches(&line).count(), 2, "{line} in:\n{rendered}");
    }
    let config = &lab.desc.haproxy.config;
    std::fs::write(config, &rendered)?;
    let check = std::process::Command::new("haproxy")
        .arg("-c")
        .arg("-f")
        .arg(config)
        .output()?;
    assert!(
        check.status.success(),
        "haproxy -c: {}",
        String::from_utf8_lossy(&check.stderr)
    );

    // HAProxy restarts from a configuration that lacks one replica: the
    // leader adds it to both backends at runtime, kept out of writes.
    let missing = lab
        .node_names()
        .into_iter()
        .find(|name| *name != primary)
        .expect("a replica");
    let without: String = rendered
        .lines()
        .filter(|line| !line.trim().starts_with(&format!("server {missing} ")))
        .map(|line| format!("{line}\n"))
        .collect();
    std::fs::write(config, without)?;
    lab.restart_haproxy()?;
    wait::until(
        "the missing member in both backends",
        PUSHED_WITHIN,
        || async {
            let state = lab.haproxy_command("show servers state")?;
            let rows: Vec<Vec<&str>> = state
                .lines()
                .map(|line| line.split_whitespace().collect::<Vec<_>>())
                .filter(|fields| fields.len() > 6 && fields[3] == missing)
                .collect();
            // Write backend: there and down. Read backend: there.
            let write_down = rows.iter().any(|f| f[1] == "jai_write" && f[5] == "0");
            let read = rows.iter().any(|f| f[1] == "jai_read");
            Ok((write_down && read).then_some(()))
        },
    )
    .await?;
    wait::until(
        "the write port to reach only the leader",
        PUSHED_WITHIN,
        || write_port_only_reaches(&lab, &primary),
    )
    .await?;
    Ok(())
}

/// `backend/server` → whether HAProxy has it up (`srv_op_state` not 0).
fn servers_up(lab: &Lab) -> Result<std::collections::BTreeMap<String, bool>> {
    let state = lab.haproxy_command("show servers state")?;
    Ok(state
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .filter(|fields| fields.len() > 6 && !fields[0].starts_with('#'))
        .map(|fields| (format!("{}/{}", fields[1], fields[3]), fields[5] != "0"))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_port_is_pushed_replicas_only_without_noloadbalance() -> Result<()> {
    let dir = lab_dir()?;
    let quiet = jai_proto::Tags {
        noloadbalance: true,
        ..Default::default()
    };
    let lab = Lab::up(LabSpec {
        haproxy_check_interval: VERY_SLOW_CHECKS,
        tags: [("pg3".to_owned(), quiet)].into(),
        ..common::spec(&dir, 3, 1)
    })
    .await?;
    let primary = lab.wait_healthy(WITHIN).await?;
    // HAProxy starts every server up; checks this slow cannot have run. Only
    // the leader's push explains the read backend: streaming replicas up, the
    // primary and the `noloadbalance` replica down.
    wait::until("the read backend pushed", PUSHED_WITHIN, || async {
        let up = servers_up(&lab)?;
        let wanted = lab.node_names().into_iter().all(|node| {
            let readable = node != primary && node != "pg3";
            up.get(&format!("jai_read/{node}")) == Some(&readable)
        });
        Ok(wanted.then_some(()))
    })
    .await?;
    Ok(())
}
