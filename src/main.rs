//! The `llm-dedup` command: parses arguments and calls the library. No caching logic lives here.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

mod cli;
mod report;

use cli::args::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("llm_dedup=info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Serve(args) => runtime.block_on(cli::serve::serve(*args)),
        Command::Stats(args) => report::stats(&args),
        Command::List(args) => report::list(&args),
        Command::Show(args) => report::show(&args),
        Command::Purge(args) => report::purge(&args),
        Command::Export(args) => report::export(&args),
        Command::Import(args) => report::import(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "error: {}",
                llm_dedup::unstable::describe_chain(
                    e.as_ref() as &(dyn std::error::Error + 'static)
                )
            );
            ExitCode::FAILURE
        }
    }
}
