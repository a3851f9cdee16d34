#!/usr/bin/env bash
# Checks scripts/images.sh on the cluster of scripts/cluster.sh: a second build gives the same
# archives byte for byte; the images import into the cluster's containerd under their versioned
# tags; in pods, the controller and the agent start (their --help), and the agent image's QEMU
# and qemu-img run. Starts the cluster if needed and leaves it up.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "images-test: FAIL: $*" >&2; exit 1; }
pass() { echo "images-test: ok: $*"; }

scripts/cluster.sh up
eval "$(scripts/cluster.sh env)"
tag=${HYPERSDK_IMAGE_TAG:-$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)}
archives=(target/images/hypersdk-agent-"$tag".tar target/images/hypersdk-controller-"$tag".tar)

scripts/images.sh
first=$(sha256sum "${archives[@]}")
scripts/images.sh --import
[ "$first" = "$(sha256sum "${archives[@]}")" ] || fail "a second build changed the archives"
pass "archives are reproducible: $(echo "$first" | cut -c1-12 | tr '\n' ' ')"

imported=$(ctr --address /run/hypersdk-cluster/containerd.sock -n k8s.io images ls -q)
for name in hypersdk-agent hypersdk-controller; do
  grep -qxF "localhost/hypersdk/$name:$tag" <<<"$imported" || fail "$name:$tag not in containerd"
done
pass "both images are in the cluster's containerd as :$tag"

# run_pod NAME IMAGE EXPECTED COMMAND...: a pod runs COMMAND to success and logs EXPECTED.
run_pod() {
  local name=$1 image=$2 expected=$3 phase
  shift 3
  kubectl delete pod "$name" --ignore-not-found --wait >/dev/null
  kubectl run "$name" --image "localhost/hypersdk/$image:$tag" --image-pull-policy Never \
    --restart Never --command -- "$@" >/dev/null
  for _ in $(seq 120); do
    phase=$(kubectl get pod "$name" -o jsonpath='{.status.phase}')
    [ "$phase" = Succeeded ] || [ "$phase" = Failed ] && break
    sleep 1
  done
  [ "$phase" = Succeeded ] || fail "pod $name ($*) ended $phase: $(kubectl logs "$name" 2>&1 | tail -3)"
  # The log can lag the phase by a moment.
  for _ in $(seq 30); do
    kubectl logs "$name" | grep -q "$expected" && break
    sleep 1
  done
  kubectl logs "$name" | grep -q "$expected" || fail "pod $name's log lacks '$expected'"
  kubectl delete pod "$name" --wait=false >/dev/null
  pass "$image runs $* in a pod"
}

run_pod controller-help hypersdk-controller Usage /usr/bin/hypersdk-controller --help
run_pod agent-help hypersdk-agent Usage /usr/bin/hypersdk-agent --help
run_pod agent-qemu hypersdk-agent "QEMU emulator version" qemu-system-x86_64 --version
run_pod agent-qemu-img hypersdk-agent "qemu-img version" qemu-img --version
echo "1 passed, 0 failed"
