//! `jaictl haproxy-config`: a complete `haproxy.cfg` from the registered
//! members, rendered by the same code the lab uses (`jai_proto::haproxy_cfg`).

use crate::cli::HaproxyConfigArgs;
use crate::cluster::ClusterState;
use crate::error::CtlError;
use jai_proto::{render_haproxy_cfg, BalancedMember, HaproxyCfgOptions};

/// The configuration for `state`'s members, sorted by name, with `args`.
pub fn render(state: &ClusterState, args: &HaproxyConfigArgs) -> Result<String, CtlError> {
    if state.members.is_empty() {
        return Err(CtlError::Refused(format!(
            "cluster {}: no member is registered in etcd yet",
            state.cluster
        )));
    }
    let mut members = state
        .members
        .iter()
        .map(|member| {
            BalancedMember::from_urls(&member.name, &member.pg_address, &member.api_url).ok_or_else(
                || {
                    CtlError::Refused(format!(
                        "member {}: its api_url {:?} has no host:port",
                        member.name, member.api_url
                    ))
                },
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    members.sort_by(|a, b| a.name.cmp(&b.name));
    let options = HaproxyCfgOptions {
        write_backend: args.write_backend.clone(),
        read_backend: args.read_backend.clone(),
        write_bind: args.write_port.clone(),
        read_bind: args.read_port.clone(),
        stats_socket: args.stats_socket.clone(),
        check_interval: args.check_interval,
        max_read_lag: args.max_read_lag,
    };
    Ok(render_haproxy_cfg(&members, &options))
}
