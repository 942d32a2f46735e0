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
        || write_port_only_reaches(&lab, &new),
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_or_stale_haproxy_is_reconciled_by_the_leader() -> Result<()> {
    let dir = lab_dir()?;
    let mut lab = Lab::up(LabSpec {
        haproxy_check_interval: VERY_SLOW_CHECKS,
        ..common::spec(&dir, 3, 1)
    })
    .await?;
    let primary = lab.wait_healthy(WITHIN).await?;

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
