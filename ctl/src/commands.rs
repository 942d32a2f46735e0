//! One function per subcommand.

use crate::agents::Agent;
use crate::cli::{
    Cli, Command, ConfigCommand, DsnArgs, DsnRole, FailoverArgs, Format, RestartArgs, RoleFilter,
    StatusArgs, SwitchoverArgs,
};
use crate::cluster::{self, ClusterState};
use crate::config::CtlConfig;
use crate::error::CtlError;
use crate::render;
use clap::CommandFactory;
use jai_grpc::{
    CancelSwitchoverRequest, FailoverRequest, PatchConfigRequest, ReinitializeRequest,
    ReloadRequest, RestartRequest, SetPauseRequest, SwitchoverRequest,
};
use jai_proto::{MemberRole, MemberState};
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant, SystemTime};

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> Result<(), CtlError> {
    match &cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "jaictl",
                &mut std::io::stdout(),
            );
            return Ok(());
        }
        Command::Man => {
            return clap_mangen::Man::new(Cli::command())
                .render(&mut std::io::stdout())
                .map_err(|error| CtlError::Refused(format!("cannot print the man page: {error}")));
        }
        _ => {}
    }
    let config = CtlConfig::load(cli.config.as_deref(), &cli.etcd, cli.cluster.as_deref())?;
    let mut etcd = cluster::connect(&config).await?;
    let state = cluster::read(&mut etcd, &config).await?;
    let mut session = Session {
        config,
        etcd,
        state,
    };
    match cli.command {
        Command::Status(args) => session.status(args).await,
        Command::Topology => {
            println!("{}", render::topology(&session.state));
            Ok(())
        }
        Command::History(args) => session.history(args.output),
        Command::Switchover(args) => session.switchover(args).await,
        Command::Failover(args) => session.failover(args).await,
        Command::Restart(args) => session.restart(args).await,
        Command::Reinit(args) => session.reinit(&args.member, args.force).await,
        Command::Reload(args) => session.reload(args.member.as_deref()).await,
        Command::Pause => session.set_pause(true).await,
        Command::Resume => session.set_pause(false).await,
        Command::Config(command) => session.config(command).await,
        Command::Dsn(args) => session.dsn(&args),
        Command::HaproxyConfig(args) => {
            print!("{}", crate::haproxy::render(&session.state, &args)?);
            Ok(())
        }
        Command::Backup(command) => crate::backup::run(&mut session, command).await,
        Command::Restore(args) => crate::backup::restore(&mut session, args).await,
        Command::Completions { .. } | Command::Man => unreachable!("handled above"),
    }
}

/// The config, an etcd connection, and the cluster as last read.
pub struct Session {
    pub(crate) config: CtlConfig,
    pub(crate) etcd: etcd_client::Client,
    pub(crate) state: ClusterState,
}

/// How often a waiting command re-reads etcd.
const POLL_EVERY: Duration = Duration::from_millis(100);

impl Session {
    pub(crate) async fn refresh(&mut self) -> Result<(), CtlError> {
        self.state = cluster::read(&mut self.etcd, &self.config).await?;
        Ok(())
    }

    pub(crate) async fn any_agent(&self) -> Result<Agent, CtlError> {
        let token = self.config.token()?;
        Agent::any(&self.config, &self.state, &token).await
    }

    async fn agent_of(&self, member: &str) -> Result<Agent, CtlError> {
        let token = self.config.token()?;
        let status = self.state.require_member(member)?;
        Agent::connect(&self.config, status, &token).await
    }

    async fn status(&mut self, args: StatusArgs) -> Result<(), CtlError> {
        let Some(every) = args.watch else {
            return print_status(&self.state, args.output.output);
        };
        if !(every.is_finite() && every >= 0.1) {
            return Err(CtlError::Usage("--watch: at least 0.1 seconds".into()));
        }
        loop {
            println!("{}", render::format_unix(unix_now()));
            print_status(&self.state, args.output.output)?;
            println!();
            tokio::time::sleep(Duration::from_secs_f64(every)).await;
            self.refresh().await?;
        }
    }

    fn history(&self, format: Format) -> Result<(), CtlError> {
        match render::structured(&self.state.history, format)? {
            Some(text) => println!("{text}"),
            None => println!("{}", render::history_table(&self.state.history)),
        }
        Ok(())
    }

    async fn switchover(&mut self, args: SwitchoverArgs) -> Result<(), CtlError> {
        if args.cancel {
            let mut agent = self.any_agent().await?;
            let (client, request) = agent.call(CancelSwitchoverRequest {});
            let reply = client
                .cancel_switchover(request)
                .await
                .map_err(|status| agent.refused(status))?;
            println!("{}", reply.into_inner().message);
            return Ok(());
        }
        let leader = self.state.leader.clone().ok_or_else(|| {
            CtlError::Refused(
                "no leader: nothing to switch over from; use `jaictl failover --to MEMBER`".into(),
            )
        })?;
        if let Some(to) = &args.to {
            self.state.require_member(to)?;
        }
        let at_unix = args.at.as_deref().map(parse_at).transpose()?;
        let target = args.to.as_deref().unwrap_or("the best replica");
        let when = at_unix
            .map(|at| format!(" at {}", render::format_unix(at)))
            .unwrap_or_default();
        confirm(
            &format!("Switch over from {leader} to {target}{when}?"),
            args.force,
        )?;
        let mut agent = self.any_agent().await?;
        let (client, request) = agent.call(SwitchoverRequest {
            from: args.from.clone().unwrap_or_default(),
            to: args.to.clone().unwrap_or_default(),
            at_unix: at_unix.unwrap_or(0),
            force: args.force,
        });
        let reply = client
            .switchover(request)
            .await
            .map_err(|status| agent.refused(status))?
            .into_inner();
        print_warnings(&reply.warnings);
        println!("{}", reply.message);
        if at_unix.is_some() {
            println!("`jaictl status` shows it pending; `jaictl switchover --cancel` cancels it.");
            return Ok(());
        }
        self.wait_for_new_leader(&leader, args.to.as_deref(), args.wait)
            .await
    }

    async fn failover(&mut self, args: FailoverArgs) -> Result<(), CtlError> {
        let target = self.state.require_member(&args.to)?.clone();
        let old_leader = self.state.leader.clone();
        if let Some(lag) = self
            .state
            .leader_position()
            .zip(target.wal_position())
            .map(|(leader, position)| leader.bytes_since(position))
            .filter(|lag| *lag > 0)
        {
            eprintln!(
                "warning: {} is {} behind the last known leader position",
                target.name,
                render::bytes(lag)
            );
        }
        confirm(&format!("Promote {}?", target.name), args.force)?;
        let mut agent = self.any_agent().await?;
        let (client, request) = agent.call(FailoverRequest {
            to: args.to.clone(),
            force: args.force,
        });
        let reply = client
            .failover(request)
            .await
            .map_err(|status| agent.refused(status))?
            .into_inner();
        print_warnings(&reply.warnings);
        println!("{}", reply.message);
        let from = old_leader.unwrap_or_default();
        self.wait_for_new_leader(&from, Some(&args.to), args.wait)
            .await
    }

    /// Waits until a member other than `old` leads and runs a primary (`to`
    /// when given), then prints the table; or says what happened instead.
    async fn wait_for_new_leader(
        &mut self,
        old: &str,
        to: Option<&str>,
        within: Duration,
    ) -> Result<(), CtlError> {
        let started = Instant::now();
        loop {
            self.refresh().await?;
            let leader = self.state.leader_member();
            let led_by_new = leader.is_some_and(|leader| {
                leader.name != old
                    && to.is_none_or(|to| leader.name == to)
                    && leader.role == MemberRole::Primary
                    && leader.state == MemberState::Running
            });
            if led_by_new && self.state.switchover.is_none() {
                let took = started.elapsed();
                println!(
                    "{} leads now (confirmed after {:.1} s).",
                    self.state.leader.as_deref().unwrap_or_default(),
                    took.as_secs_f64()
                );
                return print_status(&self.state, Format::Table);
            }
            let intent_gone = self.state.switchover.is_none();
            if intent_gone && self.state.leader.as_deref() == Some(old) && !old.is_empty() {
                let reason = self
                    .state
                    .member(old)
                    .and_then(|member| member.reason.clone())
                    .unwrap_or_else(|| "see the leader's log".into());
                print_status(&self.state, Format::Table)?;
                return Err(CtlError::Refused(format!(
                    "not done: {old} still leads: {reason}"
                )));
            }
            if started.elapsed() >= within {
                print_status(&self.state, Format::Table)?;
                return Err(CtlError::Refused(format!(
                    "not confirmed within {} s; current state above",
                    within.as_secs()
                )));
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    async fn restart(&mut self, args: RestartArgs) -> Result<(), CtlError> {
        let names: Vec<String> = match (&args.member, args.role) {
            (Some(member), _) => vec![self.state.require_member(member)?.name.clone()],
            (None, Some(role)) => self
                .state
                .members
                .iter()
                .filter(|member| {
                    let leads = self.state.leader.as_deref() == Some(member.name.as_str());
                    match role {
                        RoleFilter::Primary => leads,
                        RoleFilter::Replica => !leads,
                        RoleFilter::Any => true,
                    }
                })
                .map(|member| member.name.clone())
                .collect(),
            (None, None) => unreachable!("clap requires a member or --role"),
        };
        if names.is_empty() {
            return Err(CtlError::Refused("no member has that role".into()));
        }
        let pending = if args.pending {
            " where a restart is pending"
        } else {
            ""
        };
        confirm(
            &format!("Restart PostgreSQL on {}{pending}?", names.join(", ")),
            args.force,
        )?;
        for name in names {
            let mut agent = self.agent_of(&name).await?;
            let (client, request) = agent.call(RestartRequest {
                only_if_pending: args.pending,
            });
            let reply = client
                .restart(request)
                .await
                .map_err(|status| agent.refused(status))?;
            println!("{name}: {}", reply.into_inner().message);
        }
        Ok(())
    }

    async fn reinit(&mut self, member: &str, force: bool) -> Result<(), CtlError> {
        self.state.require_member(member)?;
        if self.state.leader.as_deref() == Some(member) {
            return Err(CtlError::Refused(format!(
                "{member} is the leader: switch over first (`jaictl switchover --from {member}`)"
            )));
        }
        confirm(
            &format!("Wipe {member}'s data directory and clone it again from the leader?"),
            force,
        )?;
        let mut agent = self.agent_of(member).await?;
        let (client, request) = agent.call(ReinitializeRequest {});
        let reply = client
            .reinitialize(request)
            .await
            .map_err(|status| agent.refused(status))?;
        println!("{member}: {}", reply.into_inner().message);
        Ok(())
    }

    async fn reload(&mut self, member: Option<&str>) -> Result<(), CtlError> {
        let names: Vec<String> = match member {
            Some(member) => vec![self.state.require_member(member)?.name.clone()],
            None => self.state.members.iter().map(|m| m.name.clone()).collect(),
        };
        let mut failed = Vec::new();
        for name in names {
            let outcome = async {
                let mut agent = self.agent_of(&name).await?;
                let (client, request) = agent.call(ReloadRequest {});
                client
                    .reload(request)
                    .await
                    .map_err(|status| agent.refused(status))
            }
            .await;
            match outcome {
                Ok(reply) => println!("{name}: {}", reply.into_inner().message),
                Err(error) => {
                    eprintln!("{name}: {error}");
                    failed.push(name);
                }
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(CtlError::Refused(format!(
                "reload failed on {}",
                failed.join(", ")
            )))
        }
    }

    async fn set_pause(&mut self, pause: bool) -> Result<(), CtlError> {
        let mut agent = self.any_agent().await?;
        let (client, request) = agent.call(SetPauseRequest { pause });
        let reply = client
            .set_pause(request)
            .await
            .map_err(|status| agent.refused(status))?;
        println!("{}", reply.into_inner().message);
        Ok(())
    }

    async fn config(&mut self, command: ConfigCommand) -> Result<(), CtlError> {
        match command {
            ConfigCommand::Show(args) => {
                let format = match args.output {
                    Format::Table => Format::Yaml,
                    other => other,
                };
                let config = self.state.readable_config()?;
                let text = render::structured(config, format)?.expect("a structured format");
                println!("{text}");
                Ok(())
            }
            ConfigCommand::Set { assignments, force } => {
                let mut patch = serde_json::Value::Object(Default::default());
                for assignment in &assignments {
                    let change = jai_proto::patch::assignment_patch(assignment)
                        .map_err(|error| CtlError::Usage(error.to_string()))?;
                    jai_proto::patch::merge(&mut patch, &change);
                }
                self.apply_config_patch(patch, force).await
            }
            ConfigCommand::Edit { force } => {
                let config = self.state.readable_config()?;
                let edited = edit_in_editor(config)?;
                let before = serde_json::to_value(config).expect("serializes");
                let patch = jai_proto::patch::difference(&before, &edited);
                self.apply_config_patch(patch, force).await
            }
        }
    }

    /// Validates locally, shows the diff, asks, then has an agent write it
    /// (which validates again against the config in etcd at that moment).
    async fn apply_config_patch(
        &mut self,
        patch: serde_json::Value,
        force: bool,
    ) -> Result<(), CtlError> {
        let config = self.state.readable_config()?;
        let after = jai_proto::patch::patched(config, &patch)
            .map_err(|error| CtlError::Usage(format!("refused: {error}")))?;
        let diff = jai_proto::patch::diff(config, &after);
        if diff.is_empty() {
            println!("Nothing to change.");
            return Ok(());
        }
        print!("{diff}");
        confirm("Apply these changes to the cluster config?", force)?;
        let mut agent = self.any_agent().await?;
        let (client, request) = agent.call(PatchConfigRequest {
            patch_json: patch.to_string(),
            dry_run: false,
        });
        let reply = client
            .patch_config(request)
            .await
            .map_err(|status| agent.refused(status))?
            .into_inner();
        if reply.diff != diff {
            println!(
                "Applied against a newer config; what changed:\n{}",
                reply.diff
            );
        } else {
            println!("Applied.");
        }
        Ok(())
    }

    fn dsn(&self, args: &DsnArgs) -> Result<(), CtlError> {
        let member = match args.role {
            DsnRole::Primary => self.state.leader_member().ok_or_else(|| {
                CtlError::Refused("no leader: there is no primary to connect to".into())
            })?,
            DsnRole::Replica => render::status_view(&self.state)
                .members
                .iter()
                .filter(|row| row.role != "Leader" && row.lsn.is_some() && row.role != "-")
                .min_by_key(|row| row.lag_bytes.unwrap_or(u64::MAX))
                .and_then(|row| self.state.member(&row.member))
                .ok_or_else(|| CtlError::Refused("no running replica".into()))?,
        };
        let (host, port) = member
            .pg_address
            .rsplit_once(':')
            .unwrap_or((member.pg_address.as_str(), "5432"));
        let mut dsn = format!("host={host} port={port} dbname={}", args.dbname);
        if let Some(user) = &args.user {
            dsn.push_str(&format!(" user={user}"));
        }
        dsn.push_str(match args.role {
            DsnRole::Primary => " target_session_attrs=read-write",
            DsnRole::Replica => " target_session_attrs=read-only",
        });
        println!("{dsn}");
        Ok(())
    }
}

fn print_status(state: &ClusterState, format: Format) -> Result<(), CtlError> {
    for unreadable in &state.unreadable {
        eprintln!("warning: {unreadable}");
    }
    let view = render::status_view(state);
    match render::structured(&view, format)? {
        Some(text) => println!("{text}"),
        None => println!("{}", render::status_table(&view)),
    }
    Ok(())
}

fn print_warnings(warnings: &[String]) {
    for warning in warnings {
        eprintln!("warning: {warning}");
    }
}

/// Asks on the terminal unless `force`; refuses to guess without one.
pub(crate) fn confirm(question: &str, force: bool) -> Result<(), CtlError> {
    if force {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        return Err(CtlError::Usage(format!(
            "{question} — not asking without a terminal: add --force"
        )));
    }
    print!("{question} [y/N] ");
    let _ = std::io::stdout().flush();
    let mut answer = String::new();
    std::io::stdin()
        .read_line(&mut answer)
        .map_err(|error| CtlError::Usage(format!("cannot read the answer: {error}")))?;
    if matches!(answer.trim(), "y" | "Y" | "yes") {
        Ok(())
    } else {
        Err(CtlError::Refused("aborted: nothing changed".into()))
    }
}

/// `--at`: RFC 3339 (`2026-11-27T05:00:00Z`) or a delay from now (`+10m`).
fn parse_at(text: &str) -> Result<u64, CtlError> {
    let bad = |why: String| CtlError::Usage(format!("--at {text:?}: {why}"));
    let at = match text.strip_prefix('+') {
        Some(delay) => {
            SystemTime::now()
                + humantime::parse_duration(delay).map_err(|error| bad(error.to_string()))?
        }
        None => humantime::parse_rfc3339_weak(text).map_err(|error| {
            bad(format!(
                "{error}; expected e.g. 2026-11-27T05:00:00Z or +10m"
            ))
        })?,
    };
    let seconds = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|_| bad("before 1970".into()))?
        .as_secs();
    if seconds + 5 < unix_now() {
        return Err(bad("is in the past".into()));
    }
    Ok(seconds)
}

/// Opens the config as YAML in `$EDITOR` and returns what was saved.
fn edit_in_editor(config: &jai_proto::DynamicConfig) -> Result<serde_json::Value, CtlError> {
    let editor = std::env::var("VISUAL")
        .or_else(|_| std::env::var("EDITOR"))
        .unwrap_or_else(|_| "vi".into());
    let path = std::env::temp_dir().join(format!("jaictl-config-{}.yaml", std::process::id()));
    let yaml = serde_saphyr::to_string(config)
        .map_err(|error| CtlError::Refused(format!("cannot print YAML: {error}")))?;
    std::fs::write(&path, yaml)
        .map_err(|error| CtlError::Refused(format!("cannot write {}: {error}", path.display())))?;
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{editor} \"$1\""))
        .arg("jaictl")
        .arg(&path)
        .status();
    let text = std::fs::read_to_string(&path);
    let _ = std::fs::remove_file(&path);
    match status {
        Ok(status) if status.success() => {}
        Ok(status) => {
            return Err(CtlError::Refused(format!(
                "{editor} exited with {status}: nothing changed"
            )))
        }
        Err(error) => return Err(CtlError::Usage(format!("cannot run {editor}: {error}"))),
    }
    let text =
        text.map_err(|error| CtlError::Refused(format!("cannot read the edited file: {error}")))?;
    serde_saphyr::from_str(&text)
        .map_err(|error| CtlError::Usage(format!("edited config: {error}")))
}

/// Wall-clock seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_takes_a_delay_or_a_time_and_refuses_the_past() {
        let soon = parse_at("+10m").unwrap();
        assert!(soon >= unix_now() + 599 && soon <= unix_now() + 601);
        assert!(parse_at("2999-01-01T00:00:00Z").is_ok());
        assert!(matches!(
            parse_at("2001-01-01T00:00:00Z"),
            Err(CtlError::Usage(_))
        ));
        assert!(matches!(parse_at("tomorrow"), Err(CtlError::Usage(_))));
    }
}
