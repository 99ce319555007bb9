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

# ---- limits: fuzz targets and a short soak (bounded; owned by the limits work) -------------
# Each fuzz target runs for FUZZ_SECONDS (default 30) on its committed corpus (fuzz/corpus,
# read only: new inputs go to a temp dir). A single allocation over 256 MiB or an RSS over
# 2 GiB counts as a failure. cargo-fuzz needs nightly features: RUSTC_BOOTSTRAP=1 lets this
# stable toolchain use them. SKIP_FUZZ=1 / SKIP_SOAK=1 leave a step out.
if [ "${SKIP_FUZZ:-0}" != 1 ]; then
    if ! cargo fuzz --version >/dev/null 2>&1; then
        echo "== installing cargo-fuzz"
        cargo install cargo-fuzz --locked
    fi
    for target in ws_frames http_bodies config jwt; do
        echo "== fuzz $target (${FUZZ_SECONDS:-30}s)"
        new_inputs="$(mktemp -d)"
        RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz "$target" "$new_inputs" "fuzz/corpus/$target" -- \
            -max_total_time="${FUZZ_SECONDS:-30}" -malloc_limit_mb=256 -rss_limit_mb=2048 -print_final_stats=1
        rm -rf "$new_inputs"
    done
fi
if [ "${SKIP_SOAK:-0}" != 1 ]; then
    echo "== soak (20s, debug build)"
    target/debug/presence-loadtest soak --duration 20s --operators 40 --widgets 50 --chat-rate 5 --timeout 3m
fi
# ---- end of the limits block ------------------------------------------------------------------
