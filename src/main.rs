//! The `contextd` command line (CONTRACT §8). Thin: parsing, then the library.

mod cli;

/// mimalloc instead of glibc malloc: the pipeline allocates and frees many
/// small and some large buffers per batch; glibc's spent over 20% of the CPU
/// of a replay in `_int_malloc` and page faults (see BENCHMARKS.md).
/// With the crate's `override` feature it is the process's `malloc` too,
/// so RocksDB's and librdkafka's allocations (write batches, memtables,
/// blocks, messages) stop paying glibc's page faults on fresh large
/// buffers (BENCHMARKS.md, item 61).
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

/// `--help` and `--version` print as clap prints them; a usage error is
/// one line on stderr (CONTRACT §8) and exit status 2, as clap's own.
fn usage_error(e: clap::Error) -> std::process::ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        e.exit();
    }
    let msg = match e.kind() {
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => match std::env::args().nth(1) {
            Some(cmd) => format!("{cmd} needs a subcommand"),
            None => {
                "a command is required: run, demo, rebuild, digest, produce, workload or checkpoint"
                    .to_string()
            }
        },
        _ => {
            // clap's first paragraph is the error (with the arguments
            // missing or the values possible), the rest usage and tips.
            let text = e.to_string();
            let first: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.is_empty())
                .collect();
            let msg = first.join(" ");
            msg.strip_prefix("error: ").unwrap_or(&msg).to_string()
        }
    };
    eprintln!("contextd: error: {msg}; see 'contextd --help'");
    std::process::ExitCode::from(2)
}

fn main() -> std::process::ExitCode {
    disable_transparent_huge_pages();
    let args = match cli::Cli::try_parse() {
        Ok(args) => args,
        Err(e) => return usage_error(e),
    };
    match cli::dispatch(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("contextd: error: {msg}");
            std::process::ExitCode::FAILURE
        }
    }
}
