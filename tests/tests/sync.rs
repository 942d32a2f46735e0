//! Synchronous replication on the real lab: no acknowledged write lost across
//! repeated SIGKILLs of the primary; a dying sync standby makes `on` fall
//! back to asynchronous commits (and say so) and makes `strict` wait.

mod common;

use anyhow::{Context, Result};
use common::{lab_dir, WITHIN};
use jai_lab::bench::{self, BenchOptions, Fault};
use jai_lab::{wait, Lab, LabSpec, StopSignal};
use jai_proto::{DynamicConfig, SynchronousMode};
use std::time::{Duration, Instant};

fn sync_lab_spec(dir: &tempfile::TempDir, nodes: usize, mode: SynchronousMode) -> LabSpec {
    LabSpec {
        dcs: Some(DynamicConfig {
            synchronous_mode: mode,
            ..DynamicConfig::default()
        }),
        ..common::spec(dir, nodes, 1)
    }
}

/// Waits until the leader lists a synchronous standby, and returns it.
async fn wait_sync_standby(lab: &Lab) -> Result<String> {
    wait::until("a synchronous standby", WITHIN, || async {
        let status = common::jaictl_status(lab)?;
        Ok(status["sync_standbys"]
            .as_array()
            .and_then(|standbys| standbys.first())
            .and_then(|name| name.as_str())
            .map(str::to_owned))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_synchronous_mode_no_acknowledged_write_is_lost_across_five_failovers() -> Result<()> {
    let dir = lab_dir()?;
    let mut lab = Lab::up(sync_lab_spec(&dir, 3, SynchronousMode::On)).await?;
    lab.wait_healthy(WITHIN).await?;
    wait_sync_standby(&lab).await?;
    let options = BenchOptions {
        runs: 5,
        run_timeout: Duration::from_secs(90),
    };
    let report = bench::run_bench(&mut lab, Fault::KillPrimary, &options).await?;
    assert_eq!(report.runs.len(), 5);
    assert!(report.acked > 0);
    assert_eq!(
        report.lost_acked,
        0,
        "acknowledged writes lost in synchronous mode:\n{}",
        report.render()
    );
    Ok(())
}

/// A row written through the write port, with a statement timeout.
async fn insert(lab: &Lab, note: &str, timeout: Duration) -> Result<()> {
    let client = lab.connect_app(&lab.desc.haproxy.write).await?;
    client
        .batch_execute(&format!(
            "SET statement_timeout = {}; CREATE TABLE IF NOT EXISTS sync_probe (note text PRIMARY KEY)",
            timeout.as_millis()
        ))
        .await?;
    client
        .execute("INSERT INTO sync_probe VALUES ($1)", &[&note])
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_sync_standby_dies_on_falls_back_to_async_and_strict_waits() -> Result<()> {
    // on: writes go on, asynchronously, and the status says so.
    let dir = lab_dir()?;
    let mut lab = Lab::up(sync_lab_spec(&dir, 2, SynchronousMode::On)).await?;
    let primary = lab.wait_healthy(WITHIN).await?;
    let standby = wait_sync_standby(&lab).await?;
    insert(&lab, "before", Duration::from_secs(10)).await?;
    lab.stop_node(&standby, StopSignal::Kill)?;
    wait::until("a write to succeed without the standby", WITHIN, || async {
        Ok(insert(
            &lab,
            &format!("after-{}", rand_suffix()),
            Duration::from_secs(2),
        )
        .await
        .ok())
    })
    .await?;
    let table =
        tokio::task::block_in_place(|| lab.jaictl(&["status"])?.output().context("jaictl"))?;
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    assert!(table.contains("running asynchronously"), "{table}");
    assert_eq!(lab.leader_key().await?.map(|(name, _)| name), Some(primary));
    lab.down()?;

    // strict: a write waits until a standby is back, then completes; none lost.
    let dir = lab_dir()?;
    let mut lab = Lab::up(sync_lab_spec(&dir, 2, SynchronousMode::Strict)).await?;
    lab.wait_healthy(WITHIN).await?;
    let standby = wait_sync_standby(&lab).await?;
    // Created while the standby streams: a DDL commit would wait too.
    insert(&lab, "before", Duration::from_secs(10)).await?;
    lab.stop_node(&standby, StopSignal::Kill)?;
    let client = lab.connect_app(&lab.desc.haproxy.write).await?;
    let started = Instant::now();
    let write = tokio::spawn(async move {
        client
            .execute("INSERT INTO sync_probe VALUES ('waited')", &[])
            .await
            .map(|_| Instant::now())
    });
    // A bounded observation: while no standby streams, the commit must not return.
    let observe_for = Duration::from_secs(3);
    while started.elapsed() < observe_for {
        assert!(
            !write.is_finished(),
            "a commit returned with no standby in strict mode"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let restarted_at = Instant::now();
    lab.start_node(&standby)?;
    let committed_at = tokio::time::timeout(WITHIN, write)
        .await
        .context("the waiting commit did not return after the standby came back")??
        .context("the waiting commit failed")?;
    assert!(
        committed_at >= restarted_at,
        "the commit returned before the standby came back"
    );
    let on_standby = lab.node(&standby)?.pg.clone();
    wait::until("the row on the standby", WITHIN, || async {
        Ok(
            common::row_exists(&lab, &on_standby, "sync_probe", "waited")
                .await
                .unwrap_or(false)
                .then_some(()),
        )
    })
    .await?;
    Ok(())
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
}
