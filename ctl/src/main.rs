//! `jaictl`: the operator CLI of jai.
//!
//! Layout: [`cli`] holds the clap definitions (and so the man page and
//! completions), [`config`] the `jaictl.yaml` file, [`cluster`] reads the
//! cluster from etcd, [`agents`] calls the agents' control API, [`render`]
//! prints, [`haproxy`] renders `haproxy.cfg`, [`backup`] runs `jaictl backup …`,
//! and [`commands`] has one function per subcommand. Errors carry
//! their exit code ([`error::CtlError`]).

mod agents;
mod backup;
mod cli;
mod cluster;
mod commands;
mod config;
mod error;
mod haproxy;
mod render;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    // `jaictl status | head` must end quietly, as Unix tools do, not panic
    // on a closed pipe: restore the default SIGPIPE action Rust ignores.
    // SAFETY: at the start of main, before any thread exists.
    unsafe {
        let _ = nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigDfl,
        );
    }
    let cli = cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("jaictl: cannot start: {error}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("jaictl: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}
