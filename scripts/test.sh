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
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --locked --no-fail-fast
    # nextest does not run doctests.
    cargo test --workspace --locked --doc
else
    cargo test --workspace --locked --no-fail-fast
fi
