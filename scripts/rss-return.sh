#!/usr/bin/env bash
# Builds the relay once per allocator candidate and runs benches/rss_return.rs over them, alternating:
# glibc malloc, glibc + malloc_trim every second, mimalloc (the alloc-* cargo features), jemalloc as the
# binary ships it (one arena), and the same jemalloc with its default arena count (4 per CPU; through
# _RJEM_MALLOC_CONF). The figures are in docs/memory-bench.md. Env: CARGO_TARGET_DIR, and the bench's
# WALCAST_BENCH_* settings (runs per candidate: WALCAST_BENCH_RUNS, default 2).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"
out="$target/alloc"
mkdir -p "$out"
cd "$root"

for candidate in glibc trim mimalloc jemalloc; do
    features=()
    [ "$candidate" != jemalloc ] && features=(--features "alloc-$candidate")
    cargo build --release --quiet --bin walcast "${features[@]}"
    # A new file, renamed over the old: a relay still running the old one keeps it.
    cp "$target/release/walcast" "$out/$candidate.new"
    mv -f "$out/$candidate.new" "$out/$candidate"
done
arenas=$((4 * $(nproc)))
printf '#!/bin/sh\n_RJEM_MALLOC_CONF=narenas:%s exec "%s" "$@"\n' "$arenas" "$out/jemalloc" >"$out/jemalloc-${arenas}arenas"
chmod +x "$out/jemalloc-${arenas}arenas"

pairs="glibc=$out/glibc,trim=$out/trim,mimalloc=$out/mimalloc,jemalloc-${arenas}arenas=$out/jemalloc-${arenas}arenas"
WALCAST_BENCH_ALLOCATORS="$pairs,jemalloc=$out/jemalloc" cargo bench --quiet --bench rss_return
