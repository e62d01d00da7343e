//! The `contextd` command line (CONTRACT §8). Thin: parsing, then the library.

mod cli;

/// mimalloc instead of glibc malloc: the pipeline allocates and frees many
/// small and some large buffers per batch; glibc's spent over 20% of the CPU
/// of a replay in `_int_malloc` and page faults (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
