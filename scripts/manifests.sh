#!/usr/bin/env bash
# Renders the Helm chart deploy/helm/hypersdk with its default values into the plain manifests
# of deploy/manifests/hypersdk.yaml (for `kubectl apply` users): scripts/manifests.sh [--check]
#   --check  renders into a temporary file and fails, showing the difference, when the
#            committed manifests differ from the chart (run by scripts/test.sh).
# Uses the helm that scripts/cluster.sh builds (target/cluster/bin/helm), else helm on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=deploy/manifests/hypersdk.yaml
HELM=target/cluster/bin/helm
[ -x "$HELM" ] || HELM=$(command -v helm) ||
  { echo "manifests: no helm: run scripts/cluster.sh up (it builds one) or install helm" >&2; exit 1; }

render() {
  cat <<'HEADER'
# Rendered from deploy/helm/hypersdk with its default values by scripts/manifests.sh; do not
# edit. Install: kubectl apply --server-side -f deploy/manifests/hypersdk.yaml
---
apiVersion: v1
kind: Namespace
metadata:
  name: hypersdk-system
HEADER
  # The chart's crds/ links to deploy/crds, which helm says of every time.
  "$HELM" template hypersdk deploy/helm/hypersdk --namespace hypersdk-system --include-crds \
    2> >(grep -v 'found symbolic link' >&2)
}

"$HELM" lint --quiet deploy/helm/hypersdk >/dev/null 2> >(grep -v 'found symbolic link' >&2)
if [ "${1:-}" = --check ]; then
  fresh=$(mktemp)
  trap 'rm -f "$fresh"' EXIT
  render >"$fresh"
  if ! diff -u "$OUT" "$fresh"; then
    echo "manifests: $OUT differs from the chart: run scripts/manifests.sh" >&2
    exit 1
  fi
  echo "manifests: $OUT matches the chart"
else
  mkdir -p "$(dirname "$OUT")"
  render >"$OUT"
  echo "manifests: wrote $OUT"
fi
