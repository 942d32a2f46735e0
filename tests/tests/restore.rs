//! The whole cluster back to a point in time, in place (`jaictl restore`),
//! on a real lab: PostgreSQL, etcd, HAProxy and pgBackRest.

mod common;

use anyhow::{Context, Result};
use common::{has_row, insert, jaictl, jaictl_status, lab_dir, running_leader, WITHIN};
use jai_lab::{wait, Lab, StopSignal};
use std::time::{Duration, SystemTime};

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

/// Waits until the wall clock has passed Unix second `second`.
async fn wait_past(second: u64) -> Result<()> {
    wait::until(
        &format!("the clock past {second}"),
        Duration::from_secs(5),
        || async { Ok((unix_now() > second).then_some(())) },
    )
    .await
}

/// `jaictl backup create --type full`, asked again while the leader's own
/// scheduled job (the first backup, its drill) still runs.
async fn full_backup(lab: &Lab) -> Result<()> {
    wait::until(
        "a full backup of my own",
        Duration::from_secs(180),
        || async {
            let run = jaictl(lab, &["backup", "create", "--type", "full"])?;
            match run.code {
                0 => Ok(Some(())),
                1 if run.printed().contains("wait for it") => Ok(None),
                _ => anyhow::bail!("jaictl backup create: exit {}: {}", run.code, run.printed()),
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_goes_back_to_a_point_in_time_with_the_same_endpoints() -> Result<()> {
    let dir = lab_dir()?;
    let mut lab = Lab::up(common::spec(&dir, 3, 1)).await?;
    lab.wait_healthy(WITHIN).await?;
    insert(&lab, "before the backup").await?;
    full_backup(&lab).await?;
    // A SIGKILL failover between the backup and T: the restore follows the
    // archive from the backup's timeline onto the new leader's.
    let first = running_leader(&jaictl_status(&lab)?).context("a leader")?;
    let timeline_before_failover = jaictl_status(&lab)?["members"][0]["timeline"]
        .as_u64()
        .context("a timeline")?;
    lab.stop_node(&first, StopSignal::Kill)?;
    wait::until("a new leader", WITHIN, || async {
        Ok(running_leader(&jaictl_status(&lab)?).filter(|name| name != &first))
    })
    .await?;
    insert(&lab, "after the failover").await?;
    lab.start_node(&first)?;
    lab.wait_healthy(WITHIN).await?;
    insert(&lab, "before T").await?;
    // T: a whole second after the last row before it, a whole second before
    // the first row after it (recovery targets are compared per commit).
    let target = unix_now() + 1;
    wait_past(target).await?;
    let target_text =
        humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + Duration::from_secs(target))
            .to_string();
    insert(&lab, "after T").await?;
    let old_timeline = jaictl_status(&lab)?["members"][0]["timeline"]
        .as_u64()
        .context("a timeline")?;
    assert!(
        old_timeline > timeline_before_failover,
        "the failover moved the timeline"
    );

    // Bad input changes nothing.
    let future = humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(3600))
        .to_string();
    let run = jaictl(&lab, &["restore", "--time", &future, "--force"])?;
    assert_eq!(run.code, 2, "a time in the future: {}", run.printed());
    assert!(run.printed().contains("in the future"), "{}", run.printed());
    let run = jaictl(
        &lab,
        &["restore", "--time", "2001-01-01T00:00:00Z", "--force"],
    )?;
    assert_eq!(run.code, 1, "before the oldest backup: {}", run.printed());
    assert!(
        run.printed()
            .contains("before the end of the oldest backup"),
        "{}",
        run.printed()
    );
    assert!(
        jaictl_status(&lab)?.get("restore").is_none(),
        "nothing recorded"
    );

    let run = jaictl(
        &lab,
        &["restore", "--time", &target_text, "--force", "--wait", "5m"],
    )?;
    assert_eq!(run.code, 0, "jaictl restore: {}", run.printed());
    assert!(
        run.printed().contains("cluster restored to"),
        "{}",
        run.printed()
    );

    // The same endpoints: the write port answers on the restored data.
    let write = lab.desc.haproxy.write.clone();
    wait::until("the write port on the restored leader", WITHIN, || async {
        Ok(has_row(&lab, &write, "before T")
            .await
            .ok()
            .filter(|found| *found))
    })
    .await?;
    assert!(has_row(&lab, &write, "before the backup").await?);
    assert!(has_row(&lab, &write, "after the failover").await?);
    assert!(
        !has_row(&lab, &write, "after T").await?,
        "a row after T survived"
    );
    insert(&lab, "after the restore").await?;

    // Every member streams on the new timeline; history says why.
    let status = wait::until("every member on the new timeline", WITHIN, || async {
        let status = jaictl_status(&lab)?;
        let members = status["members"].as_array().cloned().unwrap_or_default();
        let leader = status["leader"].as_str().unwrap_or_default().to_owned();
        let moved = members.len() == 3
            && members.iter().all(|row| {
                row["timeline"].as_u64().is_some_and(|tl| tl > old_timeline)
                    && (row["member"] == leader.as_str() || row["state"] == "streaming")
            });
        Ok((moved && status.get("restore").is_none()).then_some(status))
    })
    .await?;
    let leader = status["leader"].as_str().context("a leader")?.to_owned();
    let history = jaictl(&lab, &["history", "-o", "json"])?;
    let entries: serde_json::Value = serde_json::from_str(&history.stdout)?;
    let last = entries
        .as_array()
        .and_then(|all| all.last())
        .context("history")?;
    assert!(
        last["reason"]
            .as_str()
            .unwrap_or_default()
            .starts_with("restore to "),
        "{last}"
    );
    assert_eq!(last["new_leader"], leader.as_str());
    for node in lab.running_nodes() {
        let note = "after the restore";
        wait::until(&format!("{note:?} on {}", node.name), WITHIN, || async {
            Ok(has_row(&lab, &node.pg, note).await?.then_some(()))
        })
        .await?;
        assert!(
            !has_row(&lab, &node.pg, "after T").await?,
            "{} kept a row after T",
            node.name
        );
    }
    Ok(())
}
