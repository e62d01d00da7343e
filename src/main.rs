//! The `contextd` command line (CONTRACT §8). Thin: parsing, then the library.

mod cli;

/// mimalloc instead of glibc malloc: the pipeline allocates and frees many
/// small and some large buffers per batch; glibc's spent over 20% of the CPU
/// of a replay in `_int_malloc` and page faults (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;

extern "C" {
    /// mimalloc's `mi_option_set` (linked by the `mimalloc` crate).
    fn mi_option_set(option: std::os::raw::c_int, value: std::os::raw::c_long);
}

/// `mi_option_purge_delay` in mimalloc.h (the same index in v2 and v3).
const MI_OPTION_PURGE_DELAY: std::os::raw::c_int = 15;

/// mimalloc v3 returns freed memory to the OS after 1 s by default; 10 ms
/// (v2's default) took the peak RSS of 1M users in state from 1,033 to
/// 1,001 MiB at no measurable cost in throughput (0 ms cost 20%; BENCHMARKS.md).
/// `MIMALLOC_PURGE_DELAY` in the environment still wins.
fn tune_allocator() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets a process-wide option; mimalloc reads options atomically.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, 10) };
    }
}

fn main() -> std::process::ExitCode {
    tune_allocator();
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
