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

/// The runtime API commands that route writes to `leader` only: its server is
/// forced healthy, every other member's forced down and its sessions cut.
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
    // Success is silent; HAProxy answers errors in words ("No such server." …).
    let complaint = answer.trim();
    if complaint.is_empty() {
        Ok(())
    } else {
        Err(anyhow!("{}", complaint.replace('\n', " ")))
    }
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
    fn only_the_leader_is_forced_up() {
        let commands = route_writes_to("jai_write", "pg2", &["pg1".into(), "pg3".into()]);
        assert_eq!(commands.matches("health up").count(), 1);
        assert!(commands.starts_with("set server jai_write/pg2 health up"));
        assert!(commands.contains("shutdown sessions server jai_write/pg1"));
        assert!(commands.contains("set server jai_write/pg3 health down"));
    }
}
