//! The `jai-app` command: run the site, check a configuration, or hash the
//! admin password.

use clap::{Parser, Subcommand};
use jai_app::config::AppConfig;
use jai_app::state::App;
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// The JAI voting site.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// The YAML configuration file (docs/app.md).
    #[arg(long, short, env = "JAI_APP_CONFIG")]
    config: Option<PathBuf>,
    /// Validate the configuration and its secrets, then exit.
    #[arg(long)]
    check: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Read a password on standard input and print its argon2 hash, for
    /// `admin.password_hash_file`.
    HashPassword,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::HashPassword) = cli.command {
        return hash_password();
    }
    let Some(file) = cli.config else {
        eprintln!("jai-app: --config FILE is required");
        return ExitCode::from(2);
    };
    let loaded = AppConfig::load(&file).and_then(|config| {
        let secrets = config.load_secrets(&file)?;
        Ok((config, secrets))
    });
    let (config, secrets) = match loaded {
        Ok(loaded) => loaded,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::from(2);
        }
    };
    if cli.check {
        println!("{}: ok", file.display());
        return ExitCode::SUCCESS;
    }
    jai_proto::logging::init(&config.log, "info");
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(workers) = config.workers {
        runtime.worker_threads(workers);
    }
    let runtime = runtime.enable_all().build().expect("tokio runtime");
    match runtime.block_on(run(config, secrets)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: AppConfig, secrets: jai_app::config::Secrets) -> anyhow::Result<()> {
    let app = Arc::new(App::new(config, secrets)?);
    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
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
        tracing::info!("shutting down");
        signals.cancel();
    });
    jai_app::server::run(app, shutdown).await
}

fn hash_password() -> ExitCode {
    let mut input = String::new();
    if let Err(error) = std::io::stdin().read_to_string(&mut input) {
        eprintln!("jai-app hash-password: cannot read standard input: {error}");
        return ExitCode::from(2);
    }
    let password = input.lines().next().unwrap_or("");
    if password.is_empty() {
        eprintln!("jai-app hash-password: the password on standard input is empty");
        return ExitCode::from(2);
    }
    match jai_app::auth::hash_password(password) {
        Ok(hash) => {
            println!("{hash}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("jai-app hash-password: {error}");
            ExitCode::FAILURE
        }
    }
}
