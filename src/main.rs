//! The `walcast` binary: parses the command line and hands over to the library.

mod allocator;
mod cli;

use clap::Parser;

/// jemalloc, one arena, a background thread purging pages idle for a second
/// (settings and why: `allocator.rs`). Chosen on `scripts/rss-return.sh`
/// (benches/rss_return.rs; docs/memory-bench.md): 1,000 stalled readers,
/// `--outbox-budget 64MiB`, then every socket closed. glibc malloc kept
/// RSS at 5.6× the baseline 15 s after the close, mimalloc at 2.7×;
/// glibc + malloc_trim and jemalloc gave it back within 2 s, but only
/// jemalloc with one arena also peaked within budget + 32 MiB (+93 MiB over
/// the baseline, against +116…160 MiB for the others).
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
