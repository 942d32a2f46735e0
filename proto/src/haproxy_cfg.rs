//! Renders a complete `haproxy.cfg` for a cluster from its registered members:
//! what `jaictl haproxy-config` prints and the lab runs.
//!
//! Each server line carries every option itself (no `default-server`), because
//! HAProxy's runtime `add server` reuses nothing from `default-server`: the
//! agent adds a new member with [`server_options`], the very same options.

use std::fmt::Write as _;
use std::time::Duration;

/// One member as HAProxy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BalancedMember {
    /// Member name: the server name in both backends.
    pub name: String,
    /// `host:port` of its PostgreSQL.
    pub pg_address: String,
    /// `host:port` of its health API (where the checks go).
    pub api_address: String,
}

impl BalancedMember {
    /// A member from its published addresses; `api_url` is `http://HOST:PORT[/]`.
    /// `None` when the API URL has no `host:port`.
    pub fn from_urls(name: &str, pg_address: &str, api_url: &str) -> Option<Self> {
        let api_address = api_url
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .trim_end_matches('/');
        let (host, port) = api_address.rsplit_once(':')?;
        if host.is_empty() || port.parse::<u16>().is_err() {
            return None;
        }
        Some(Self {
            name: name.to_owned(),
            pg_address: pg_address.to_owned(),
            api_address: api_address.to_owned(),
        })
    }

    /// The health API's host and port.
    fn api_host_port(&self) -> (&str, &str) {
        self.api_address
            .rsplit_once(':')
            .unwrap_or((&self.api_address, ""))
    }
}

/// What the rendered configuration listens on and how it checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HaproxyCfgOptions {
    /// `listen` section (and backend) for writes.
    pub write_backend: String,
    /// `listen` section (and backend) for reads.
    pub read_backend: String,
    /// Bind address of the write port, e.g. `0.0.0.0:5000`.
    pub write_bind: String,
    /// Bind address of the read port, e.g. `0.0.0.0:5001`.
    pub read_bind: String,
    /// The admin runtime API: a Unix socket path, or `HOST:PORT`.
    pub stats_socket: String,
    /// Health-check interval (`inter`, `fastinter`, `downinter`).
    pub check_interval: Duration,
    /// The read backend's check: `/replica?lag=<bytes>`.
    pub max_read_lag: u64,
}

impl Default for HaproxyCfgOptions {
    fn default() -> Self {
        Self {
            write_backend: "jai_write".into(),
            read_backend: "jai_read".into(),
            write_bind: "0.0.0.0:5000".into(),
            read_bind: "0.0.0.0:5001".into(),
            stats_socket: "/run/haproxy/admin.sock".into(),
            check_interval: Duration::from_secs(2),
            max_read_lag: 1 << 20,
        }
    }
}

/// The options after a server's address on every server line, and in the
/// agent's `add server`: checks against the member's health API.
pub fn server_options(member: &BalancedMember, check_interval: Duration) -> String {
    let inter = check_interval.as_millis().max(1);
    let (host, port) = member.api_host_port();
    format!(
        "check addr {host} port {port} inter {inter}ms fastinter {inter}ms downinter {inter}ms \
         fall 2 rise 1 on-marked-down shutdown-sessions"
    )
}

/// The `stats socket` line for a Unix path or a `HOST:PORT`.
fn stats_socket_line(socket: &str) -> String {
    if socket.starts_with('/') {
        format!("stats socket {socket} mode 600 level admin")
    } else {
        format!("stats socket ipv4@{socket} level admin")
    }
}

/// A complete `haproxy.cfg`: a write listener checking `/primary` and a read
/// listener checking `/replica?lag=…`, every member in both, sessions cut when
/// a server is marked down, an admin stats socket for the agents' pushes.
pub fn render_haproxy_cfg(members: &[BalancedMember], options: &HaproxyCfgOptions) -> String {
    let mut cfg = format!(
        "# Written by jai (jaictl haproxy-config). Servers are the cluster's members;\n\
         # the agents push role changes over the stats socket, the checks are the safety net.\n\
         global\n    {socket}\n    stats timeout 30s\n\n\
         defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 30m\n    \
         timeout server 30m\n    timeout check 1s\n\n",
        socket = stats_socket_line(&options.stats_socket)
    );
    let read_check = format!("/replica?lag={}", options.max_read_lag);
    for (name, bind, path) in [
        (&options.write_backend, &options.write_bind, "/primary"),
        (
            &options.read_backend,
            &options.read_bind,
            read_check.as_str(),
        ),
    ] {
        let _ = write!(
            cfg,
            "listen {name}\n    bind {bind}\n    balance roundrobin\n    option httpchk\n    \
             http-check send meth GET uri {path}\n    http-check expect status 200\n"
        );
        for member in members {
            let _ = writeln!(
                cfg,
                "    server {} {} {}",
                member.name,
                member.pg_address,
                server_options(member, options.check_interval)
            );
        }
        cfg.push('\n');
    }
    cfg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members() -> Vec<BalancedMember> {
        vec![
            BalancedMember::from_urls("pg1", "10.0.0.1:5432", "http://10.0.0.1:8008").unwrap(),
            BalancedMember::from_urls("pg2", "10.0.0.2:5432", "http://10.0.0.2:8008/").unwrap(),
        ]
    }

    /// The lines of the section that starts with `header`.
    fn section<'a>(cfg: &'a str, header: &str) -> Vec<&'a str> {
        cfg.lines()
            .skip_while(|line| *line != header)
            .skip(1)
            .take_while(|line| line.starts_with("    "))
            .map(str::trim)
            .collect()
    }

    #[test]
    fn api_urls_become_check_addresses() {
        let member = BalancedMember::from_urls("pg1", "db:5432", "http://api:8008/").unwrap();
        assert_eq!(member.api_address, "api:8008");
        assert!(BalancedMember::from_urls("pg1", "db:5432", "http://api").is_none());
        assert!(BalancedMember::from_urls("pg1", "db:5432", "http://api:x").is_none());
    }

    #[test]
    fn both_listeners_hold_every_member_with_its_checks() {
        let options = HaproxyCfgOptions {
            check_interval: Duration::from_millis(1500),
            max_read_lag: 4096,
            ..Default::default()
        };
        let cfg = render_haproxy_cfg(&members(), &options);
        assert_eq!(
            section(&cfg, "global"),
            [
                "stats socket /run/haproxy/admin.sock mode 600 level admin",
                "stats timeout 30s"
            ]
        );
        let defaults = section(&cfg, "defaults");
        for timeout in ["connect", "client", "server", "check"] {
            assert!(
                defaults
                    .iter()
                    .any(|line| line.starts_with(&format!("timeout {timeout} "))),
                "timeout {timeout} missing: {defaults:?}"
            );
        }
        let write = section(&cfg, "listen jai_write");
        assert!(write.contains(&"bind 0.0.0.0:5000"));
        assert!(write.contains(&"http-check send meth GET uri /primary"));
        let read = section(&cfg, "listen jai_read");
        assert!(read.contains(&"bind 0.0.0.0:5001"));
        assert!(read.contains(&"http-check send meth GET uri /replica?lag=4096"));
        for listener in [&write, &read] {
            let servers: Vec<_> = listener
                .iter()
                .filter(|line| line.starts_with("server "))
                .collect();
            assert_eq!(servers.len(), 2);
            assert_eq!(
                *servers[1],
                "server pg2 10.0.0.2:5432 check addr 10.0.0.2 port 8008 inter 1500ms \
                 fastinter 1500ms downinter 1500ms fall 2 rise 1 on-marked-down shutdown-sessions"
            );
        }
    }

    #[test]
    fn a_tcp_stats_socket_is_bound_as_ipv4() {
        let options = HaproxyCfgOptions {
            stats_socket: "127.0.0.1:9999".into(),
            ..Default::default()
        };
        let cfg = render_haproxy_cfg(&[], &options);
        assert!(cfg.contains("stats socket ipv4@127.0.0.1:9999 level admin\n"));
    }
}
