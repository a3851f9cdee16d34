#!/usr/bin/env bash
# Regenerates the dashboard's screenshots in docs/ (light and dark): runs its browser test, which
# saves them while the seed VM runs on a real agent.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
mkdir -p docs
HYPERSDK_SCREENSHOTS="$PWD/docs" cargo nextest run -p hypersdk-tests --test dashboard \
  --no-capture dashboard_follows_the_seed_vm
ls docs/dashboard-*.png
