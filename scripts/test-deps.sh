#!/usr/bin/env bash
# Installs what walcast's tests need beyond Rust and PostgreSQL: Node.js + npm and the pinned
# JavaScript clients (tests/clients/node_modules), a Python venv with the pinned Python client
# (tests/clients/.venv), and Chromium. Idempotent: installs only what is missing or stale, and
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

# The JavaScript clients, from the committed lockfile.
stamp="$clients/node_modules/.test-deps-stamp"
if [ ! -f "$stamp" ] || [ "$clients/package-lock.json" -nt "$stamp" ] ||
    [ "$clients/package.json" -nt "$stamp" ]; then
    quiet "npm ci in tests/clients" npm ci --prefix "$clients" --no-audit --no-fund --loglevel=error
    touch "$stamp"
    echo "installed tests/clients/node_modules (npm ci: $(cd "$clients" && node -p \
        "const l=require('./package-lock.json').packages; ['@supabase/supabase-js','realtime-js-2-80','ws'].map(n=>n+' '+l['node_modules/'+n].version).join(', ')"))"
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
