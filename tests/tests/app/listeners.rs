//! The app's listeners against clients that hold connections open (issue
//! #18: connections that never finished their headers stayed open for more
//! than 75 s and exhausted file descriptors). The lab runs the instances
//! with `connections.header_read_timeout: 2s` and `max_connections: 32`
//! ([`HEADER_READ_TIMEOUT`], [`MAX_CONNECTIONS`]).

use anyhow::{anyhow, ensure, Result};
use jai_lab::lab_app::{scrape_metrics, AppClient, AppInfo};
use jai_lab::Lab;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `connections.header_read_timeout` of the lab's instances.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(2);
/// `connections.max_connections` of the lab's instances.
pub const MAX_CONNECTIONS: usize = 32;

pub async fn run(lab: &Lab) -> Result<()> {
    let app = lab
        .desc
        .app
        .as_ref()
        .ok_or_else(|| anyhow!("lab without app"))?;
    let instance = &app.instances[0];
    for url in [&instance.url, &instance.admin_url] {
        slow_headers_are_cut(url).await?;
    }
    cap_keeps_the_instance_healthy(app).await
}

fn address(url: &str) -> &str {
    url.trim_start_matches("http://")
}

/// Opens a connection and sends the start of a request, never its end.
async fn slow_client(url: &str) -> Result<TcpStream> {
    let mut stream = TcpStream::connect(address(url)).await?;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: slow\r\n")
        .await?;
    Ok(stream)
}

/// True when the server has closed `stream` (EOF or reset) within `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buffer = [0u8; 512];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// A slowloris client (one header line every 500 ms, never the blank line)
/// is disconnected within the header timeout.
async fn slow_headers_are_cut(url: &str) -> Result<()> {
    let mut stream = slow_client(url).await?;
    let start = Instant::now();
    for line in 0.. {
        let sent = stream
            .write_all(format!("X-Slow-{line}: 1\r\n").as_bytes())
            .await;
        if sent.is_err() || closed_within(&mut stream, Duration::from_millis(500)).await {
            break;
        }
        ensure!(
            start.elapsed() < HEADER_READ_TIMEOUT + Duration::from_secs(3),
            "{url}: a client sending its headers slowly is still connected after {:?}",
            start.elapsed()
        );
    }
    eprintln!("{url}: slow headers cut after {:?}", start.elapsed());
    Ok(())
}

/// Open file descriptors of process `pid`.
fn open_files(pid: i32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// Three times the cap of slow connections on one instance: the instance
/// keeps at most the cap open, answers its health check at once, HAProxy
/// keeps sending it votes, and every slow connection is gone after the
/// header timeout.
async fn cap_keeps_the_instance_healthy(app: &AppInfo) -> Result<()> {
    let instance = &app.instances[0];
    let pid = instance
        .pid
        .ok_or_else(|| anyhow!("{} is not running", instance.name))?;
    let files_before = open_files(pid)?;
    let mut slow = Vec::new();
    for _ in 0..3 * MAX_CONNECTIONS {
        slow.push(slow_client(&instance.url).await?);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let files_during = open_files(pid)?;
    ensure!(
        files_during <= files_before + MAX_CONNECTIONS + 8,
        "{}: {files_before} open files before, {files_during} with {} slow clients (cap {MAX_CONNECTIONS})",
        instance.name,
        slow.len()
    );
    let client = AppClient::new()?;
    let started = Instant::now();
    let health = client.get(&format!("{}/healthz", instance.url)).await?;
    ensure!(
        health.status == 200 && started.elapsed() < Duration::from_secs(1),
        "{}: /healthz answered {} after {:?} with the cap full of slow clients",
        instance.name,
        health.status,
        started.elapsed()
    );
    let through_haproxy = client.get(&format!("{}/healthz", app.url)).await?;
    ensure!(
        through_haproxy.status == 200,
        "the site answered {} with an instance's cap full",
        through_haproxy.status
    );
    let mut evicted = 0;
    for stream in &mut slow {
        if closed_within(stream, Duration::from_millis(1)).await {
            evicted += 1;
        }
    }
    ensure!(
        evicted >= 2 * MAX_CONNECTIONS,
        "only {evicted} of {} slow connections were closed at the cap",
        slow.len()
    );
    for stream in &mut slow {
        ensure!(
            closed_within(stream, HEADER_READ_TIMEOUT + Duration::from_secs(3)).await,
            "a slow connection outlived the header timeout"
        );
    }
    let metrics = scrape_metrics(app, &instance.admin_url).await?.body;
    for reason in ["evicted", "header_timeout"] {
        let needle = format!(
            "jai_app_http_connections_closed_total{{listener=\"public\",reason=\"{reason}\"}}"
        );
        ensure!(
            metrics.contains(&needle),
            "{}: metrics lack {needle}",
            instance.name
        );
    }
    Ok(())
}
