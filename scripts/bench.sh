#!/usr/bin/env bash
# Runs a benchmark from tests/benches (default: all) on a release build.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --workspace --bins --locked -q
if [ $# -gt 0 ]; then
  for b in "$@"; do cargo bench -p hypersdk-tests --bench "$b" --locked; done
else
  cargo bench -p hypersdk-tests --locked
fi
