//! The agent refuses bad configuration files at start-up: exit code 2, and a
//! message naming the file, the key and the reason.

use std::path::Path;
use std::process::Command;

const GOOD: &str = "name: pg1
cluster: votes
state_dir: /tmp/jai-config-test/state
etcd:
  endpoints: [http://127.0.0.1:2379]
api:
  listen: 127.0.0.1:8008
postgresql:
  data_dir: /tmp/jai-config-test/data
  listen: 127.0.0.1:5432
  run_as: postgres
  superuser: {username: postgres, password: secret}
  replication: {username: replicator, password: secret2}
bootstrap:
  dcs:
    ttl: 5s
    loop_wait: 1s
    retry_timeout: 2s
";

/// Runs `jai-agent --check -c FILE` on `text` and returns (exit code, stderr).
fn check(text: Option<&str>) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.yaml");
    if let Some(text) = text {
        std::fs::write(&file, text).unwrap();
    }
    run(&file)
}

fn run(file: &Path) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_jai-agent"))
        .arg("--check")
        .arg("--config")
        .arg(file)
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn a_good_file_passes_the_check() {
    let (code, stderr) = check(Some(GOOD));
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn a_missing_file_is_named() {
    let (code, stderr) = check(None);
    assert_eq!(code, 2);
    assert!(stderr.contains("agent.yaml: cannot read"), "{stderr}");
}

#[test]
fn an_unknown_key_is_named() {
    let (code, stderr) = check(Some(&GOOD.replace("state_dir:", "stat_dir:")));
    assert_eq!(code, 2);
    assert!(stderr.contains("agent.yaml"), "{stderr}");
    assert!(stderr.contains("stat_dir"), "{stderr}");
}

#[test]
fn a_bad_duration_is_named() {
    let (code, stderr) = check(Some(&GOOD.replace("loop_wait: 1s", "loop_wait: soon")));
    assert_eq!(code, 2);
    assert!(stderr.contains("agent.yaml"), "{stderr}");
    assert!(stderr.contains("soon"), "{stderr}");
}

#[test]
fn a_ttl_too_small_for_loop_wait_and_retries_is_refused() {
    let (code, stderr) = check(Some(&GOOD.replace("ttl: 5s", "ttl: 3s")));
    assert_eq!(code, 2);
    assert!(stderr.contains("bootstrap.dcs.ttl"), "{stderr}");
    assert!(stderr.contains("loop_wait + 2 * retry_timeout"), "{stderr}");
}

#[test]
fn an_absurd_ttl_is_refused_with_the_reason() {
    let (code, stderr) = check(Some(&GOOD.replace("ttl: 5s", "ttl: 1000000h")));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("ttl"), "{stderr}");
    assert!(stderr.contains("above the maximum of 10m"), "{stderr}");
}

#[test]
fn a_secret_file_others_can_read_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("replication.pw");
    std::fs::write(&secret, "secret2\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let text = GOOD.replace(
        "replication: {username: replicator, password: secret2}",
        &format!(
            "replication: {{username: replicator, password_file: {}}}",
            secret.display()
        ),
    );
    let (code, stderr) = check(Some(&text));
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("postgresql.replication.password_file") && stderr.contains("chmod 600"),
        "{stderr}"
    );
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, stderr) = check(Some(&text));
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn the_check_survives_a_closed_pipe() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.yaml");
    std::fs::write(&file, GOOD).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_jai-agent"))
        .arg("--check")
        .arg("--config")
        .arg(&file)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader goes away before the line is written
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "exit 101 is a panic: {status:?}");
}

#[test]
fn an_unreadable_password_file_is_named() {
    let text = GOOD.replace(
        "password: secret2",
        "password_file: /nonexistent/replication.pw",
    );
    let (code, stderr) = check(Some(&text));
    assert_eq!(code, 2);
    assert!(stderr.contains("postgresql.replication"), "{stderr}");
    assert!(stderr.contains("/nonexistent/replication.pw"), "{stderr}");
}

#[test]
fn a_wildcard_listen_address_needs_a_connect_address() {
    let text = GOOD.replace("listen: 127.0.0.1:5432", "listen: 0.0.0.0:5432");
    let (code, stderr) = check(Some(&text));
    assert_eq!(code, 2);
    assert!(stderr.contains("postgresql.connect_address"), "{stderr}");
}

#[test]
fn the_haproxy_section_is_checked_key_by_key() {
    let with = |section: &str| format!("{GOOD}haproxy:\n{section}");
    let (code, stderr) = check(Some(&with(
        "  sockets: [/run/haproxy/admin.sock, 127.0.0.1:9999]\n  read_backend: jai_ro\n  max_read_lag: 16MB\n  check_interval: 1s\n",
    )));
    assert_eq!(code, 0, "{stderr}");
    for (section, key, reason) in [
        ("  sockets: [admin.sock]\n", "haproxy.sockets[0]", "neither"),
        ("  sockets: []\n", "haproxy.sockets", "at least one"),
        (
            "  sockets: [/a.sock]\n  max_read_lag: 16XB\n",
            "haproxy.max_read_lag",
            "unknown unit",
        ),
        (
            "  sockets: [/a.sock]\n  read_backend: jai_write\n",
            "haproxy.read_backend",
            "must differ",
        ),
    ] {
        let (code, stderr) = check(Some(&with(section)));
        assert_eq!(code, 2, "{section}: {stderr}");
        assert!(
            stderr.contains(&format!("agent.yaml: {key}: ")) && stderr.contains(reason),
            "{section}: {stderr}"
        );
    }
    let (code, stderr) = check(Some(&with("  sockets: [/a.sock]\n  read_lag: 1\n")));
    assert_eq!(code, 2);
    assert!(stderr.contains("read_lag"), "{stderr}");
}
