#!/usr/bin/env bash
# Runs every check and test: formatting, clippy, unit tests, and end-to-end tests on real QEMU.
# Installs what it needs first (QEMU, the test guest) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== build"
cargo build --workspace --bins --tests --locked
echo "== tests"
# Each end-to-end test boots real guests; two at a time fit a 2-core machine.
cargo nextest run --workspace --locked --no-fail-fast --test-threads 2 "$@"
