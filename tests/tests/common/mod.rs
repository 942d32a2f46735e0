//! Helpers shared by the integration test files (each file includes this module).

#![allow(dead_code)] // each test file uses a different subset

use anyhow::{Context, Result};
use jai_lab::{Lab, LabSpec};
use std::time::Duration;

/// How long a lab may take to come up or to settle after a fault.
pub const WITHIN: Duration = Duration::from_secs(60);

/// A fresh lab directory under /tmp, removed afterwards unless `JAI_KEEP_LAB`
/// is set (then its logs stay for a post-mortem).
pub fn lab_dir() -> Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new()
        .prefix("jai-test-")
        .disable_cleanup(std::env::var_os("JAI_KEEP_LAB").is_some())
        .tempdir_in("/tmp")?)
}

/// A lab of `nodes` nodes and `etcd_members` etcd members in `dir`.
pub fn spec(dir: &tempfile::TempDir, nodes: usize, etcd_members: usize) -> LabSpec {
    LabSpec {
        etcd_members,
        timeout: Duration::from_secs(120),
        ..LabSpec::new(dir.path(), nodes)
    }
}

/// Writes a row `note` through HAProxy's write port, as the application would.
pub async fn insert(lab: &Lab, note: &str) -> Result<()> {
    let client = lab.connect_app(&lab.desc.haproxy.write).await?;
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS probe (id serial PRIMARY KEY, note text NOT NULL)",
        )
        .await?;
    client
        .execute("INSERT INTO probe (note) VALUES ($1)", &[&note])
        .await?;
    Ok(())
}

/// Whether the server at `address` has the row `note`.
pub async fn has_row(lab: &Lab, address: &str, note: &str) -> Result<bool> {
    let client = lab.connect_app(address).await?;
    let row = client
        .query_opt("SELECT 1 FROM probe WHERE note = $1", &[&note])
        .await
        .context("reading probe")?;
    Ok(row.is_some())
}

/// Waits until every running node has the row `note`.
pub async fn wait_replicated(lab: &Lab, note: &str) -> Result<()> {
    for node in lab.running_nodes() {
        jai_lab::wait::until(&format!("{note:?} on {}", node.name), WITHIN, || async {
            Ok(has_row(lab, &node.pg, note).await?.then_some(()))
        })
        .await?;
    }
    Ok(())
}

/// Whether `table` (a test's own table with a `note` column) on the server at
/// `address` has the row `note`.
pub async fn row_exists(lab: &Lab, address: &str, table: &str, note: &str) -> Result<bool> {
    let client = lab.connect_app(address).await?;
    let row = client
        .query_opt(&format!("SELECT 1 FROM {table} WHERE note = $1"), &[&note])
        .await
        .with_context(|| format!("reading {table}"))?;
    Ok(row.is_some())
}

/// `jaictl status -o json` against the lab, parsed.
pub fn jaictl_status(lab: &Lab) -> Result<serde_json::Value> {
    let output = tokio::task::block_in_place(|| {
        lab.jaictl(&["status", "-o", "json"])?
            .output()
            .context("jaictl")
    })?;
    anyhow::ensure!(output.status.success(), "jaictl status: {output:?}");
    serde_json::from_slice(&output.stdout).context("jaictl status JSON")
}

/// The leader in a `jaictl status` JSON, once it runs a primary.
pub fn running_leader(status: &serde_json::Value) -> Option<String> {
    let leader = status["leader"].as_str()?;
    let row = status["members"]
        .as_array()?
        .iter()
        .find(|row| row["member"] == leader)?;
    (row["role"] == "Leader" && row["state"] == "running").then(|| leader.to_owned())
}

/// Every member but `leader` streams, as the leader last published it (what a
/// switchover is checked against).
pub fn others_stream(status: &serde_json::Value, leader: &str) -> bool {
    status["members"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|row| row["member"] != leader)
        .all(|row| row["state"] == "streaming")
}

/// Checks that the log file at `path` is in `log.format: json`: at least one
/// line, and every line one JSON object with a level and a message. Returns
/// the messages, for the caller's own checks.
pub fn json_log_messages(path: &std::path::Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut messages = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let event: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON: {line}", path.display(), number + 1))?;
        anyhow::ensure!(
            event["level"].is_string() && event["timestamp"].is_string(),
            "{}:{}: no level or timestamp: {line}",
            path.display(),
            number + 1
        );
        let message = event["fields"]["message"].as_str().with_context(|| {
            format!(
                "{}:{}: no fields.message: {line}",
                path.display(),
                number + 1
            )
        })?;
        messages.push(message.to_owned());
    }
    anyhow::ensure!(!messages.is_empty(), "{} is empty", path.display());
    Ok(messages)
}

/// What one `jaictl` run printed and how it exited.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// stdout and stderr together, for messages that may be on either.
    pub fn printed(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

pub fn jaictl(lab: &Lab, args: &[&str]) -> Result<Run> {
    let output = tokio::task::block_in_place(|| lab.jaictl(args)?.output().context("jaictl"))?;
    Ok(Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

/// Runs `jaictl` and requires exit 0.
pub fn jaictl_ok(lab: &Lab, args: &[&str]) -> Result<Run> {
    let run = jaictl(lab, args)?;
    anyhow::ensure!(run.code == 0, "jaictl {args:?} failed: {run}");
    Ok(run)
}
