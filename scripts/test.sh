#!/usr/bin/env bash
# Runs every check and test: formatting, clippy, unit tests, end-to-end tests on real QEMU, and
# the end-to-end test of the Helm chart on a real one-node Kubernetes (scripts/k8s-e2e.sh).
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
echo "== Kubernetes end-to-end (the chart on the one-node cluster of scripts/cluster.sh)"
scripts/k8s-e2e.sh
