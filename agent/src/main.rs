//! `jai-agent`: the daemon on each PostgreSQL node.

use anyhow::Result;
use clap::Parser;
use jai_agent::config::AgentConfig;
use std::path::PathBuf;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

/// Supervises one PostgreSQL node: leader election in etcd, replication,
/// health API for HAProxy.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The agent's YAML configuration file.
    #[arg(short, long, env = "JAI_AGENT_CONFIG")]
    config: PathBuf,
    /// Validate the configuration file and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    // The fence keeper the agent spawns (`keeper.rs`): hidden, no config.
    if std::env::args_os().nth(1).as_deref() == Some(jai_agent::keeper::COMMAND.as_ref()) {
        let args = jai_agent::keeper::KeeperArgs::parse_from(std::env::args_os().skip(1));
        return jai_agent::keeper::run(args);
    }
    let args = Args::parse();
    let config = match AgentConfig::load(&args.config)
        .and_then(|config| config.check_environment(&args.config).map(|()| config))
    {
        Ok(config) => config,
        Err(error) => {
            eprintln!("jai-agent: invalid configuration: {error}");
            return ExitCode::from(2);
        }
    };
    if args.check {
        // A closed pipe (`jai-agent --check | true`) is no reason to panic.
        use std::io::Write;
        let _ = writeln!(
            std::io::stdout(),
            "{}: configuration is valid",
            args.config.display()
        );
        return ExitCode::SUCCESS;
    }
    jai_proto::logging::init(&config.log, "info,tokio_postgres=warn,h2=warn,tower=warn");
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("jai-agent: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: AgentConfig) -> Result<()> {
    let stop = CancellationToken::new();
    let signal_stop = stop.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("signal received: stopping");
        signal_stop.cancel();
    });
    jai_agent::shell::run(config, stop).await
}
