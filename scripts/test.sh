#!/usr/bin/env bash
# Runs every test of the workspace. Installs what is missing first (redis-server for the
# Redis backend tests, cargo-nextest when absent falls back to cargo test).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
    echo "== installing redis-server (Debian package)"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
    # The package may start a system instance; the tests start their own on free ports.
    $SUDO systemctl disable --now redis-server >/dev/null 2>&1 || true
fi

echo "== build"
cargo build --workspace --all-targets --locked

echo "== tests"
# ---- browser and JS client tests: their own block (issue 11); runs after the Rust tests ----
# Installs what a fresh Debian machine lacks (as root, or with sudo): Debian's chromium (no
# browser is ever downloaded by Playwright) and the Node packages of package-lock.json.
js_setup() {
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
        echo "== installing nodejs and npm (Debian packages)"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nodejs npm >/dev/null
    fi
    if ! node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)'; then
        echo "Node.js 20 or newer is needed for the JS tests (found $(node --version))" >&2
        exit 1
    fi
    if [ ! -x /usr/bin/chromium ]; then
        echo "== installing chromium (Debian package)"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
    fi
    # npm ci only when node_modules was not installed from this very lock file.
    for dir in clients/js e2e; do
        if ! cmp -s "$dir/package-lock.json" "$dir/node_modules/.installed-lock.json"; then
            echo "== npm ci in $dir"
            (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error &&
                mkdir -p node_modules && cp package-lock.json node_modules/.installed-lock.json)
        fi
    done
}
js_tests() {
    echo "== JS client tests (node --test, against target/debug/presence-hub)"
    (cd clients/js && npm test)
    echo "== console in Chromium (playwright-core, /usr/bin/chromium headless)"
    (cd e2e && npm test)
}
# ---- end of the browser and JS client block ----

if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --locked --no-fail-fast
    # nextest does not run doctests.
    cargo test --workspace --locked --doc
else
    cargo test --workspace --locked --no-fail-fast
fi

js_setup
js_tests
