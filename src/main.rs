//! The `contextd` command line (CONTRACT §8). Thin: parsing, then the library.

mod cli;

/// mimalloc instead of glibc malloc: the pipeline allocates and frees many
/// small and some large buffers per batch; glibc's spent over 20% of the CPU
/// of a replay in `_int_malloc` and page faults (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;

/// Transparent huge pages off for this process, unless the operator chose
/// with mimalloc's own `MIMALLOC_ALLOW_THP`. mimalloc asks for huge pages on
/// its arenas, and every fresh one is a 2 MiB page the kernel zeroes at its
/// first touch, however little of it is used: in the embedded scenario
/// that zeroing was about 6% of all CPU samples, and turning it off took
/// 6–8% off the CPU per record (alternated pairs, BENCHMARKS.md item 41).
/// The flag is the process's, so it covers RocksDB's allocations as well.
fn disable_transparent_huge_pages() {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
        return;
    }
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and touches no memory
    // of ours; on a kernel without it the call fails and nothing changes.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

fn main() -> std::process::ExitCode {
    disable_transparent_huge_pages();
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
