//! The `contextd` command line (CONTRACT §8). Thin: parsing, then the library.

mod cli;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = cli::Cli::parse();
    match cli::dispatch(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("contextd: error: {msg}");
            std::process::ExitCode::FAILURE
        }
    }
}
