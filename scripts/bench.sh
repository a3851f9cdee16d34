#!/usr/bin/env bash
# Runs benchmarks from tests/benches on a release build: the ones named (startup, resize,
# migration, migration_tls, snapshot, scheduler, controller_scale, image_import, backup), or all of them.
set -euo pipefail
cd "$(dirname "$0")/.."
for b in "$@"; do
  case "$b" in
    startup | resize | migration | migration_tls | snapshot | scheduler | controller_scale | image_import | backup) ;;
    *) echo "usage: $0 [startup|resize|migration|migration_tls|snapshot|scheduler|controller_scale|image_import|backup]..." >&2; exit 2 ;;
  esac
done
scripts/setup.sh
cargo build --release --workspace --bins --locked -q
if [ $# -gt 0 ]; then
  for b in "$@"; do cargo bench -p hypersdk-tests --bench "$b" --locked; done
else
  cargo bench -p hypersdk-tests --locked
fi
