//! The real `jaictl` binary against a real lab: status, switchover (named,
//! any, scheduled, cancelled), config changes, history, maintenance mode and
//! failover without a leader, plus the control API's token check.

mod common;

use anyhow::{Context, Result};
use common::{
    jaictl, jaictl_ok, jaictl_status as status_json, lab_dir, others_stream, running_leader, WITHIN,
};
use jai_lab::{wait, Lab, StopSignal};
use std::time::{Duration, Instant};

/// Waits until `want` (or, with `None`, any member but `not`) leads a
/// cluster where every other member streams again.
async fn wait_led_by(lab: &Lab, not: &str, want: Option<&str>) -> Result<String> {
    wait::until(
        "a new leader with every replica streaming",
        WITHIN,
        || async {
            let status = status_json(lab)?;
            let Some(leader) = running_leader(&status) else {
                return Ok(None);
            };
            if leader == not || want.is_some_and(|want| want != leader) {
                return Ok(None);
            }
            Ok(others_stream(&status, &leader).then_some(leader))
        },
    )
    .await
}

fn other_than(lab: &Lab, not: &str) -> String {
    lab.node_names()
        .into_iter()
        .find(|name| name != not)
        .expect("a lab of several nodes")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_drives_the_cluster_with_jaictl() -> Result<()> {
    let dir = lab_dir()?;
    let lab = Lab::up(common::spec(&dir, 3, 1)).await?;
    let first = lab.wait_healthy(WITHIN).await?;
    let first = wait_led_by(&lab, "", Some(&first)).await?;

    // status: the table and its JSON twin.
    let table = jaictl_ok(&lab, &["status"])?;
    assert!(
        table
            .stdout
            .contains(&format!("Cluster: {}", lab.desc.cluster)),
        "{table}"
    );
    assert!(
        table.stdout.contains("Leader") && table.stdout.contains("streaming"),
        "{table}"
    );
    let status = status_json(&lab)?;
    assert_eq!(status["members"].as_array().map(Vec::len), Some(3));
    assert_eq!(status["paused"], false);
    let list = jaictl_ok(&lab, &["list", "-o", "yaml"])?;
    assert!(list.stdout.contains(&format!("leader: {first}")), "{list}");

    // An unreachable etcd is exit 3 and names what to check.
    let unreachable = jaictl(&lab, &["status", "--etcd", "http://127.0.0.1:9"])?;
    assert_eq!(unreachable.code, 3, "{unreachable}");
    assert!(
        unreachable
            .stderr
            .contains("etcd unreachable at http://127.0.0.1:9"),
        "{unreachable}"
    );

    // config set: an invalid value is refused with the setting named,
    // nothing is written; a valid one is applied with its diff.
    let refused = jaictl(&lab, &["config", "set", "ttl=1s", "--force"])?;
    assert_eq!(refused.code, 2, "{refused}");
    assert!(refused.stderr.contains("ttl"), "{refused}");
    let absurd = jaictl(&lab, &["config", "set", "ttl=1000000h", "--force"])?;
    assert_eq!(absurd.code, 2, "{absurd}");
    assert!(
        absurd.stderr.contains("ttl") && absurd.stderr.contains("above the maximum of 10m"),
        "{absurd}"
    );
    let unknown = jaictl(&lab, &["config", "set", "ttll=10s", "--force"])?;
    assert_eq!(unknown.code, 2, "{unknown}");
    let applied = jaictl_ok(
        &lab,
        &[
            "config",
            "set",
            "postgresql.parameters.work_mem=8MB",
            "--force",
        ],
    )?;
    assert!(
        applied
            .stdout
            .contains("postgresql.parameters.work_mem: (default) -> 8MB"),
        "{applied}"
    );
    let shown = jaictl_ok(&lab, &["config", "show", "-o", "json"])?;
    let config: serde_json::Value = serde_json::from_str(&shown.stdout)?;
    assert_eq!(config["postgresql"]["parameters"]["work_mem"], "8MB");
    assert_eq!(
        config["ttl"], "4s",
        "the refused change must not be written"
    );

    // An unreadable key hides nothing else: status warns and shows the
    // cluster; a config change is refused while `config` is unreadable.
    let keys = jai_proto::ClusterKeys::new(&lab.desc.cluster);
    let mut etcd = lab.etcd().await?;
    let config_text = etcd
        .get(keys.config(), None)
        .await?
        .kvs()
        .first()
        .map(|kv| kv.value().to_vec())
        .context("the config key")?;
    etcd.put(keys.sync(), "not json", None).await?;
    let warned = jaictl_ok(&lab, &["status"])?;
    assert!(
        warned
            .stderr
            .contains(&format!("etcd key {} is unreadable", keys.sync()))
            && warned.stdout.contains(&first),
        "{warned}"
    );
    etcd.put(keys.config(), "{broken", None).await?;
    let refused = jaictl(&lab, &["config", "set", "loop_wait=2s", "--force"])?;
    assert_eq!(refused.code, 1, "{refused}");
    assert!(refused.stderr.contains("is unreadable"), "{refused}");
    jaictl_ok(&lab, &["status"])?;
    etcd.put(keys.config(), config_text, None).await?;
    etcd.delete(keys.sync(), None).await?;

    // Without --force and without a terminal, nothing is asked or done.
    let unconfirmed = jaictl(&lab, &["switchover"])?;
    assert_eq!(unconfirmed.code, 2, "{unconfirmed}");
    assert!(unconfirmed.stderr.contains("add --force"), "{unconfirmed}");

    // Switchover to a named member: done and confirmed with the new table.
    let target = other_than(&lab, &first);
    let run = jaictl_ok(&lab, &["switchover", "--to", &target, "--force"])?;
    assert!(run.stdout.contains(&format!("{target} leads now")), "{run}");
    let second = wait_led_by(&lab, &first, Some(&target)).await?;

    // Refused with the reason: the target is the leader already.
    let same = jaictl(&lab, &["switchover", "--to", &second, "--force"])?;
    assert_eq!(same.code, 1, "{same}");
    assert!(same.stderr.contains("already the leader"), "{same}");

    // Switchover to "any": the best streaming replica.
    jaictl_ok(&lab, &["switchover", "--force"])?;
    let third = wait_led_by(&lab, &second, None).await?;

    // A scheduled switchover is pending, then executed at its time.
    let scheduled = jaictl_ok(&lab, &["switchover", "--at", "+3s", "--force"])?;
    assert!(scheduled.stdout.contains("scheduled for"), "{scheduled}");
    let pending = jaictl_ok(&lab, &["status"])?;
    assert!(
        pending.stdout.contains("Pending switchover: from"),
        "{pending}"
    );
    let fourth = wait_led_by(&lab, &third, None).await?;
    wait::until("the executed intent to be cleared", WITHIN, || async {
        Ok(status_json(&lab)?["pending_switchover"]
            .is_null()
            .then_some(()))
    })
    .await?;

    // A cancelled one is not executed.
    jaictl_ok(&lab, &["switchover", "--at", "+2s", "--force"])?;
    let cancelled = jaictl_ok(&lab, &["switchover", "--cancel"])?;
    assert!(cancelled.stdout.contains("cancelled"), "{cancelled}");
    let watch_until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < watch_until {
        let status = status_json(&lab)?;
        assert_eq!(
            status["leader"],
            fourth.as_str(),
            "a cancelled switchover ran"
        );
        assert!(status["pending_switchover"].is_null());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // History lists every change of leader, with its reason.
    let history = jaictl_ok(&lab, &["history", "-o", "json"])?;
    let entries: Vec<serde_json::Value> = serde_json::from_str(&history.stdout)?;
    let switchovers: Vec<(String, String)> = entries
        .iter()
        .filter(|entry| {
            entry["reason"]
                .as_str()
                .unwrap_or_default()
                .starts_with("switchover")
        })
        .map(|entry| {
            (
                entry["new_leader"].as_str().unwrap_or_default().to_owned(),
                entry["reason"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        switchovers,
        vec![
            (second.clone(), format!("switchover from {first}")),
            (third.clone(), format!("switchover from {second}")),
            (fourth.clone(), format!("switchover from {third}")),
        ],
        "{history}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_api_refuses_changes_without_the_token() -> Result<()> {
    use jai_grpc::control_client::ControlClient;
    use jai_grpc::{SetPauseRequest, StatusRequest};
    let dir = lab_dir()?;
    let lab = Lab::up(common::spec(&dir, 1, 1)).await?;
    lab.wait_healthy(WITHIN).await?;
    let mut client = ControlClient::connect(lab.desc.nodes[0].grpc.clone()).await?;

    // Reads are open, like the health API.
    let status = client.status(StatusRequest {}).await?.into_inner();
    assert_eq!(status.members.len(), 1);

    // A change without a token, or with a wrong one, is refused and not made.
    let refused = client
        .set_pause(SetPauseRequest { pause: true })
        .await
        .expect_err("pausing without the token must be refused");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let mut wrong = tonic::Request::new(SetPauseRequest { pause: true });
    wrong
        .metadata_mut()
        .insert("authorization", "Bearer not-the-token-at-all".parse()?);
    let refused = client
        .set_pause(wrong)
        .await
        .expect_err("a wrong token must be refused");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    assert!(!client.status(StatusRequest {}).await?.into_inner().paused);

    // jaictl with a wrong token file: a configuration error, exit 2.
    let bad_token = dir.path().join("bad-token");
    std::fs::write(&bad_token, "definitely-not-the-token\n")?;
    let config = dir.path().join("bad-jaictl.yaml");
    std::fs::write(
        &config,
        std::fs::read_to_string(&lab.desc.jaictl_config)?.replace(
            &lab.desc.control_token_file.display().to_string(),
            &bad_token.display().to_string(),
        ),
    )?;
    let output = tokio::task::block_in_place(|| {
        std::process::Command::new(lab.jaictl_binary()?)
            .arg("-c")
            .arg(&config)
            .arg("pause")
            .output()
            .context("jaictl")
    })?;
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("control token"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_mode_holds_failover_back_until_resumed_or_ordered() -> Result<()> {
    let dir = lab_dir()?;
    let mut lab = Lab::up(common::spec(&dir, 3, 1)).await?;
    let first = lab.wait_healthy(WITHIN).await?;
    wait_led_by(&lab, "", Some(&first)).await?;
    let ttl = Duration::from_secs(4);

    // Paused: the primary dies and nobody takes over; status says why.
    let paused = jaictl_ok(&lab, &["pause"])?;
    assert!(paused.stdout.contains("maintenance mode on"), "{paused}");
    lab.stop_node(&first, StopSignal::Kill)?;
    wait::until("the dead leader's key to expire", WITHIN, || async {
        Ok(lab.leader_key().await?.is_none().then_some(()))
    })
    .await?;
    let watch_until = Instant::now() + 2 * ttl;
    while Instant::now() < watch_until {
        assert_eq!(
            lab.leader_key().await?,
            None,
            "a member took the key while paused"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let table = jaictl_ok(&lab, &["status"])?;
    assert!(table.stdout.contains("Maintenance mode: on"), "{table}");
    assert!(table.stdout.contains("No leader"), "{table}");

    // Resumed: the usual failover follows.
    jaictl_ok(&lab, &["resume"])?;
    let second = wait::until("a new leader after resume", WITHIN, || async {
        Ok(running_leader(&status_json(&lab)?).filter(|leader| *leader != first))
    })
    .await?;
    // The remaining replica must follow the new leader (its timeline) before
    // maintenance mode freezes it again: a replica left on the old timeline
    // is rightly not eligible for the failover below.
    wait::until(
        "the other replica streaming from the new leader",
        WITHIN,
        || async { Ok(others_stream(&status_json(&lab)?, &second).then_some(())) },
    )
    .await?;

    // Paused again, the new leader dies too: an operator's failover to a
    // named member is carried out even in maintenance mode.
    jaictl_ok(&lab, &["pause"])?;
    let target = lab
        .node_names()
        .into_iter()
        .find(|name| *name != first && *name != second)
        .expect("three nodes");
    lab.stop_node(&second, StopSignal::Kill)?;
    wait::until("the second leader's key to expire", WITHIN, || async {
        Ok(lab.leader_key().await?.is_none().then_some(()))
    })
    .await?;
    let refused = jaictl(&lab, &["failover", "--to", &second, "--force"])?;
    assert_eq!(
        refused.code, 2,
        "a dead member cannot be promoted: {refused}"
    );
    assert!(refused.stderr.contains("is not a member"), "{refused}");
    let run = jaictl_ok(&lab, &["failover", "--to", &target, "--force"])?;
    assert!(run.stdout.contains(&format!("{target} leads now")), "{run}");
    let history = jaictl_ok(&lab, &["history"])?;
    assert!(history.stdout.contains("manual failover"), "{history}");
    jaictl_ok(&lab, &["resume"])?;
    Ok(())
}

/// When the postmaster of the server at `address` started.
async fn started_at(lab: &Lab, address: &str) -> Result<String> {
    let client = lab.connect_superuser(address, "postgres").await?;
    let row = client
        .query_one("SELECT pg_postmaster_start_time()::text", &[])
        .await?;
    Ok(row.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_reload_and_reinit_act_on_one_member() -> Result<()> {
    let dir = lab_dir()?;
    let lab = Lab::up(common::spec(&dir, 2, 1)).await?;
    let leader = lab.wait_healthy(WITHIN).await?;
    wait_led_by(&lab, "", Some(&leader)).await?;
    let replica = other_than(&lab, &leader);
    let (leader_pg, replica_pg) = (
        lab.node(&leader)?.pg.clone(),
        lab.node(&replica)?.pg.clone(),
    );
    let term = lab.leader_key().await?;

    // Restarting the leader's PostgreSQL is no failover: same key, same term.
    let before = started_at(&lab, &leader_pg).await?;
    let run = jaictl_ok(&lab, &["restart", &leader, "--force"])?;
    assert!(run.stdout.contains("restarted as primary"), "{run}");
    assert_ne!(started_at(&lab, &leader_pg).await?, before);
    assert_eq!(
        lab.leader_key().await?,
        term,
        "a restart must not change the leader"
    );

    // A replica restarts as a replica and streams again; --pending skips it.
    let run = jaictl_ok(
        &lab,
        &["restart", "--role", "replica", "--pending", "--force"],
    )?;
    assert!(run.stdout.contains("nothing done"), "{run}");
    let before = started_at(&lab, &replica_pg).await?;
    jaictl_ok(&lab, &["restart", &replica, "--force"])?;
    assert_ne!(started_at(&lab, &replica_pg).await?, before);
    wait_led_by(&lab, "", Some(&leader)).await?;

    // Reload reaches every member.
    let run = jaictl_ok(&lab, &["reload"])?;
    assert_eq!(run.stdout.matches("reloaded").count(), 2, "{run}");

    // Reinitialise: refused on the leader; a replica is wiped, cloned again
    // and streams.
    let refused = jaictl(&lab, &["reinit", &leader, "--force"])?;
    assert_eq!(refused.code, 1, "{refused}");
    assert!(refused.stderr.contains("is the leader"), "{refused}");
    let before = started_at(&lab, &replica_pg).await?;
    let run = jaictl_ok(&lab, &["reinit", &replica, "--force"])?;
    assert!(run.stdout.contains("cloning from"), "{run}");
    wait::until("the re-cloned replica to stream", WITHIN, || async {
        let restarted = started_at(&lab, &replica_pg)
            .await
            .ok()
            .filter(|at| *at != before);
        let streaming = leads_with_all_streaming(&lab, &leader)?;
        Ok((restarted.is_some() && streaming).then_some(()))
    })
    .await?;
    assert_eq!(lab.leader_key().await?, term);
    Ok(())
}

/// One look: `leader` leads and every other member streams.
fn leads_with_all_streaming(lab: &Lab, leader: &str) -> Result<bool> {
    let status = status_json(lab)?;
    Ok(running_leader(&status).as_deref() == Some(leader) && others_stream(&status, leader))
}
