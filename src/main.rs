//! The `walcast` binary: parses the command line and hands over to the library.

mod allocator;
mod cli;

use clap::Parser;

/// jemalloc, one arena, a background thread purging pages idle for a second
/// (settings and why: `allocator.rs`). Chosen on
/// `WALCAST_BENCH_RUNS=3 scripts/rss-return.sh` (benches/rss_return.rs,
/// docs/memory-bench.md): 1,000 stalled readers, a 64 MiB outbox budget,
/// then every socket closed. 10 s after the close glibc malloc still held
/// 5.9× its baseline RSS and mimalloc 3.5× (medians); glibc + malloc_trim
/// and jemalloc were within 20 % of it in at most 1.2 s. Only jemalloc with
/// one arena also peaked within baseline + budget + 32 MiB: +91.1 MiB (runs
/// 90.2–91.2), against medians of +121…147 MiB for the others.
#[global_allocator]
static GLOBAL: allocator::Allocator = allocator::ALLOCATOR;

fn main() -> std::process::ExitCode {
    allocator::start();
    let cli = cli::Cli::parse();
    cli::init_tracing(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("walcast: cannot start the async runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("walcast: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
