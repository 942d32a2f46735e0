//! Integration tests on real etcd, PostgreSQL and HAProxy, started by the lab.

use anyhow::{Context, Result};
use jai_lab::{wait, Lab, LabSpec, StopSignal, REPLICATION_USER};
use std::collections::BTreeSet;
use std::time::Duration;

mod common;

use common::{has_row, insert, jaictl_status, lab_dir, spec, WITHIN};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_boot_replicate_and_route() -> Result<()> {
    let dir = lab_dir()?;
    let lab = Lab::up(spec(&dir, 3, 3)).await?;
    let primary = lab.wait_healthy(WITHIN).await?;

    // lab.json (world-readable) and what `jai-lab up` prints hold no secret:
    // they point to the 0600 files.
    let described = std::fs::read_to_string(lab.desc.dir.join("lab.json"))?;
    let printed = lab.instructions()?;
    for entry in std::fs::read_dir(lab.desc.dir.join("secrets"))? {
        let path = entry?.path();
        let secret = std::fs::read_to_string(&path)?;
        let secret = secret.trim();
        if secret.len() >= 8 {
            assert!(
                !described.contains(secret),
                "lab.json holds {}",
                path.display()
            );
            assert!(
                !printed.contains(secret),
                "jai-lab up prints {}",
                path.display()
            );
        }
    }

    // Exactly one primary, and it holds the leader key.
    assert_eq!(lab.etcd_value("leader").await?, Some(primary.clone()));
    let replicas: Vec<_> = lab
        .desc
        .nodes
        .iter()
        .filter(|n| n.name != primary)
        .collect();
    assert_eq!(replicas.len(), 2);
    for node in &lab.desc.nodes {
        let is_primary = node.name == primary;
        assert_eq!(
            lab.api_code(node, "/primary").await?,
            if is_primary { 200 } else { 503 },
            "{}",
            node.name
        );
        assert_eq!(
            lab.api_code(node, "/replica").await?,
            if is_primary { 503 } else { 200 },
            "{}",
            node.name
        );
        assert_eq!(lab.api_code(node, "/health").await?, 200, "{}", node.name);
    }

    // Patroni-compatible details HAProxy configurations rely on.
    let http = reqwest::Client::builder().no_proxy().build()?;
    let primary_api = &lab.node(&primary)?.api;
    let replica_api = &replicas[0].api;
    for method in [reqwest::Method::HEAD, reqwest::Method::OPTIONS] {
        let response = http
            .request(method.clone(), format!("{primary_api}/primary"))
            .send()
            .await?;
        assert_eq!(response.status(), 200, "{method} /primary");
        assert!(
            response.bytes().await?.is_empty(),
            "{method} answers with the status line only"
        );
        let response = http
            .request(method.clone(), format!("{replica_api}/primary"))
            .send()
            .await?;
        assert_eq!(response.status(), 503, "{method} /primary on a replica");
    }
    let code = |url: String| {
        let http = http.clone();
        async move { Ok::<_, anyhow::Error>(http.get(url).send().await?.status().as_u16()) }
    };
    assert_eq!(code(format!("{replica_api}/replica?lag=1GB")).await?, 200);
    assert_eq!(code(format!("{replica_api}/read-only")).await?, 200);
    assert_eq!(code(format!("{primary_api}/read-write")).await?, 200);
    assert_eq!(code(format!("{replica_api}/replica?lag=lots")).await?, 400);
    let status: serde_json::Value = http
        .get(format!("{primary_api}/status"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(status["name"], primary.as_str());
    assert_eq!(status["accepts_writes"], true);

    // Both replicas stream from the primary, each through its own slot.
    let primary_node = lab.node(&primary)?;
    let admin = lab.connect_superuser(&primary_node.pg, "postgres").await?;
    let streaming: BTreeSet<String> = admin
        .query(
            "SELECT r.application_name FROM pg_stat_replication r \
             JOIN pg_replication_slots s ON s.active_pid = r.pid \
             WHERE r.state = 'streaming' AND s.slot_name = 'jai_' || r.application_name",
            &[],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let replica_names: BTreeSet<String> = replicas.iter().map(|n| n.name.clone()).collect();
    assert_eq!(streaming, replica_names);

    // A row written through HAProxy's write port reaches every replica.
    insert(&lab, "hello from the write port").await?;
    for replica in &replicas {
        wait::until(
            &format!("the row on {}", replica.name),
            Duration::from_secs(10),
            || async {
                Ok(has_row(&lab, &replica.pg, "hello from the write port")
                    .await?
                    .then_some(()))
            },
        )
        .await?;
    }

    // The read port reaches only replicas, and both of them.
    let mut seen = BTreeSet::new();
    for _ in 0..6 {
        // HAProxy closes a connection it has no server for: on a loaded
        // machine a check can time out now and then (this test is about
        // where reads go, not about check timing).
        let client = wait::until("a connection through the read port", WITHIN, || async {
            Ok(lab.connect_app(&lab.desc.haproxy.read).await.ok())
        })
        .await?;
        let row = client
            .query_one(
                "SELECT pg_is_in_recovery(), current_setting('cluster_name')",
                &[],
            )
            .await?;
        assert!(row.get::<_, bool>(0), "read port reached a primary");
        seen.insert(row.get::<_, String>(1));
    }
    assert_eq!(seen, replica_names);

    // A standby that should stream and cannot (its connection cut, its role
    // refused) leaves /replica, and so the read port, while it still runs;
    // it is back once it streams again.
    let cut = &replicas[0];
    admin
        .batch_execute(&format!("ALTER ROLE {REPLICATION_USER} NOLOGIN"))
        .await?;
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_replication WHERE application_name = $1",
            &[&cut.name],
        )
        .await?;
    wait::until(
        &format!("{} out of /replica while it does not stream", cut.name),
        Duration::from_secs(20),
        || async { Ok((lab.api_code(cut, "/replica").await? == 503).then_some(())) },
    )
    .await?;
    assert_eq!(lab.api_code(cut, "/health").await?, 200, "it still runs");
    assert_eq!(lab.api_code(replicas[1], "/replica").await?, 200);
    // The leader takes it out of the read backend too (it publishes that it
    // does not stream), so the read port reaches only the other replica.
    let other = BTreeSet::from([replicas[1].name.clone()]);
    wait::until(
        "reads through the read port only on the streaming replica",
        Duration::from_secs(20),
        || async {
            let mut seen = BTreeSet::new();
            for _ in 0..6 {
                let client = lab.connect_app(&lab.desc.haproxy.read).await?;
                let row = client
                    .query_one("SELECT current_setting('cluster_name')", &[])
                    .await?;
                seen.insert(row.get::<_, String>(0));
            }
            Ok((seen == other).then_some(()))
        },
    )
    .await?;
    wait::until(
        "jaictl status to show the replica as not streaming",
        Duration::from_secs(20),
        || async {
            let status = jaictl_status(&lab)?;
            let state = status["members"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|row| row["member"] == cut.name.as_str())
                .map(|row| row["state"].clone());
            Ok((state == Some("not streaming".into())).then_some(()))
        },
    )
    .await?;
    admin
        .batch_execute(&format!("ALTER ROLE {REPLICATION_USER} LOGIN"))
        .await?;
    wait::until(
        &format!("{} back in /replica once it streams", cut.name),
        Duration::from_secs(30),
        || async { Ok((lab.api_code(cut, "/replica").await? == 200).then_some(())) },
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_every_agent_keeps_the_same_primary_and_data() -> Result<()> {
    let dir = lab_dir()?;
    let mut lab = Lab::up(spec(&dir, 3, 1)).await?;
    let primary = lab.wait_healthy(WITHIN).await?;
    let system_id = lab.etcd_value("initialize").await?;
    insert(&lab, "before the restart").await?;

    let names = lab.node_names();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    lab.stop_nodes(&names, StopSignal::Term)?;
    for node in &lab.desc.nodes {
        assert!(
            jai_lab::process::postmaster_pid(&node.data_dir).is_none(),
            "{} still runs PostgreSQL",
            node.name
        );
    }
    assert_eq!(
        lab.etcd_value("leader").await?,
        None,
        "the leader released its key"
    );
    for name in &names {
        lab.start_node(name)?;
    }

    let after = lab.wait_healthy(WITHIN).await?;
    assert_eq!(after, primary, "a restart must not move the primary");
    assert_eq!(
        lab.etcd_value("initialize").await?,
        system_id,
        "no re-bootstrap"
    );
    assert!(has_row(&lab, &lab.desc.haproxy.write, "before the restart").await?);
    let history = lab
        .etcd_value("history")
        .await?
        .unwrap_or_else(|| "[]".into());
    let history: Vec<serde_json::Value> = serde_json::from_str(&history)?;
    assert!(
        history
            .iter()
            .all(|entry| entry["new_leader"] == primary.as_str()),
        "no other member was promoted: {history:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_name_in_use_is_joined_never_reinitialised() -> Result<()> {
    let (dir_a, dir_foreign, dir_b) = (lab_dir()?, lab_dir()?, lab_dir()?);
    let cluster = "votes".to_owned();
    let lab = Lab::up(LabSpec {
        cluster: cluster.clone(),
        ..spec(&dir_a, 2, 1)
    })
    .await?;
    let system_id = lab
        .etcd_value("initialize")
        .await?
        .context("no initialize key")?;
    let leader = lab.etcd_value("leader").await?;

    // A data directory of another system: a one-node cluster with its own etcd.
    let mut foreign = Lab::up(LabSpec {
        cluster: cluster.clone(),
        node_prefix: "foreign".into(),
        ..spec(&dir_foreign, 1, 1)
    })
    .await?;
    let foreign_id = foreign
        .etcd_value("initialize")
        .await?
        .context("no foreign initialize key")?;
    assert_ne!(foreign_id, system_id);
    foreign.down()?;

    // Same cluster name, same etcd: one member with an empty data directory,
    // one with the foreign one copied in.
    let joiner_data = dir_b.path().join("nodes/joiner2");
    std::fs::create_dir_all(&joiner_data)?;
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(&foreign.desc.nodes[0].data_dir)
        .arg(joiner_data.join("data"))
        .status()?;
    assert!(copied.success());
    let joiners = Lab::launch(&LabSpec {
        cluster: cluster.clone(),
        node_prefix: "joiner".into(),
        external_etcd: Some(lab.desc.etcd.clone()),
        secrets_from: Some(lab.desc.dir.clone()),
        ..spec(&dir_b, 2, 1)
    })?;
    let (empty, alien) = (&joiners.desc.nodes[0], &joiners.desc.nodes[1]);

    wait::until("the empty joiner to clone and stream", WITHIN, || async {
        Ok((joiners.api_code(empty, "/replica").await? == 200).then_some(()))
    })
    .await?;
    let reason = wait::until(
        "the foreign data directory to be refused",
        WITHIN,
        || async {
            let status = joiners.api_status(alien).await?;
            Ok((status["state"] == "refused")
                .then(|| status["reason"].as_str().unwrap_or_default().to_owned()))
        },
    )
    .await?;
    assert!(
        reason.contains(&format!("belongs to system {foreign_id}")),
        "{reason}"
    );
    assert!(
        reason.contains(&format!("is system {system_id}")),
        "{reason}"
    );
    assert!(
        jai_lab::process::postmaster_pid(&alien.data_dir).is_none(),
        "refused member started PostgreSQL"
    );

    assert_eq!(
        lab.etcd_value("initialize").await?,
        Some(system_id),
        "initialize untouched"
    );
    assert_eq!(lab.etcd_value("leader").await?, leader, "leader untouched");
    Ok(())
}
