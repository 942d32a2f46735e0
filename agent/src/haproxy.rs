//! Pushes role changes to HAProxy's runtime API, so routing follows a
//! promotion at once instead of at the next health check (DESIGN.md §5).
//!
//! Health checks stay the safety net: a push only ever marks *this* member up
//! in the write backend, right after it promoted while holding the key and a
//! confirmed lease (what `/primary` checks), and marks members down.

use anyhow::{anyhow, Context, Result};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long one HAProxy may take to take a push: one being down delays nothing.
const PUSH_TIMEOUT: Duration = Duration::from_millis(500);

/// Where HAProxy's admin-level runtime API listens and which backends are ours.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaproxyConfig {
    /// Runtime API sockets: a Unix socket path, or `HOST:PORT`.
    pub sockets: Vec<String>,
    /// The backend (or `listen` section) routing writes to the primary.
    #[serde(default = "default_write_backend")]
    pub write_backend: String,
}

fn default_write_backend() -> String {
    "jai_write".into()
}

/// Routes writes to `leader` only, on every HAProxy at once: its server is
/// forced healthy, every other server of the backend (members that died and
/// left etcd included: HAProxy's own list is asked) forced down, sessions cut.
/// Returns one error line per HAProxy that failed.
pub async fn route_writes_only_to(sockets: &[String], backend: &str, leader: &str) -> Vec<String> {
    let mut sends = tokio::task::JoinSet::new();
    for socket in sockets {
        let (socket, backend, leader) = (socket.clone(), backend.to_owned(), leader.to_owned());
        sends.spawn(async move {
            let routed = async {
                let state =
                    exchange_with(&socket, &format!("show servers state {backend}")).await?;
                let others: Vec<String> = server_names(&state)
                    .into_iter()
                    .filter(|name| *name != leader)
                    .collect();
                send(&socket, &route_writes_to(&backend, &leader, &others)).await
            };
            match tokio::time::timeout(2 * PUSH_TIMEOUT, routed).await {
                Ok(Ok(())) => None,
                Ok(Err(error)) => Some(format!("HAProxy {socket}: {error:#}")),
                Err(_) => Some(format!(
                    "HAProxy {socket}: no answer within {:?}",
                    2 * PUSH_TIMEOUT
                )),
            }
        });
    }
    sends.join_all().await.into_iter().flatten().collect()
}

/// Server names from `show servers state` (the fourth column of each data line).
fn server_names(state: &str) -> Vec<String> {
    state
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split_whitespace().nth(3))
        .map(str::to_owned)
        .collect()
}

/// The runtime API commands that route writes to `leader` only: its server is
/// forced healthy, every other one forced down and its sessions cut.
pub fn route_writes_to(backend: &str, leader: &str, others: &[String]) -> String {
    let mut commands = vec![format!("set server {backend}/{leader} health up")];
    for other in others {
        commands.push(format!("set server {backend}/{other} health down"));
        commands.push(format!("shutdown sessions server {backend}/{other}"));
    }
    commands.join("; ")
}

/// The commands that take `member` out of the write backend and cut its sessions.
pub fn stop_writes_to(backend: &str, member: &str) -> String {
    format!(
        "set server {backend}/{member} health down; shutdown sessions server {backend}/{member}"
    )
}

/// Sends `commands` to every socket at once; returns one error line per socket
/// that failed (the caller logs them), never blocks longer than `PUSH_TIMEOUT`.
pub async fn push(sockets: &[String], commands: &str) -> Vec<String> {
    let mut sends = tokio::task::JoinSet::new();
    for socket in sockets {
        let (socket, commands) = (socket.clone(), commands.to_owned());
        sends.spawn(async move {
            match tokio::time::timeout(PUSH_TIMEOUT, send(&socket, &commands)).await {
                Ok(Ok(())) => None,
                Ok(Err(error)) => Some(format!("HAProxy {socket}: {error:#}")),
                Err(_) => Some(format!(
                    "HAProxy {socket}: no answer within {PUSH_TIMEOUT:?}"
                )),
            }
        });
    }
    sends.join_all().await.into_iter().flatten().collect()
}

async fn send(socket: &str, commands: &str) -> Result<()> {
    let answer = exchange_with(socket, commands).await?;
    // Success is silent; HAProxy answers errors in words ("No such server." …).
    let complaint = answer.trim();
    if complaint.is_empty() {
        Ok(())
    } else {
        Err(anyhow!("{}", complaint.replace('\n', " ")))
    }
}

/// Sends `commands` on a new connection to `socket` and returns the answer.
async fn exchange_with(socket: &str, commands: &str) -> Result<String> {
    let answer = if socket.starts_with('/') {
        let mut stream = tokio::net::UnixStream::connect(socket)
            .await
            .context("connecting")?;
        exchange(&mut stream, commands).await?
    } else {
        let mut stream = tokio::net::TcpStream::connect(socket)
            .await
            .context("connecting")?;
        exchange(&mut stream, commands).await?
    };
    Ok(answer)
}

async fn exchange<S: AsyncReadExt + AsyncWriteExt + Unpin>(
    stream: &mut S,
    commands: &str,
) -> Result<String> {
    stream.write_all(format!("{commands}\n").as_bytes()).await?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await?;
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_come_from_the_state_dump() {
        let state = "1\n# be_id be_name srv_id srv_name srv_addr\n2 jai_write 1 pg1 127.0.0.1 2 0\n2 jai_write 2 pg2 127.0.0.1 0 0\n";
        assert_eq!(
            server_names(state),
            vec!["pg1".to_owned(), "pg2".to_owned()]
        );
    }

    #[test]
    fn only_the_leader_is_forced_up() {
        let commands = route_writes_to("jai_write", "pg2", &["pg1".into(), "pg3".into()]);
        assert_eq!(commands.matches("health up").count(), 1);
        assert!(commands.starts_with("set server jai_write/pg2 health up"));
        assert!(commands.contains("shutdown sessions server jai_write/pg1"));
        assert!(commands.contains("set server jai_write/pg3 health down"));
    }
}
