#!/usr/bin/env bash
# End-to-end check of scripts/cluster.sh on this machine: `up` brings the node to Ready; a pod with
# a locally imported image runs, gets a pod address and its service-account token, and is deleted
# with its container; the API server answers at the kubernetes Service's address through
# kube-proxy; a second `up` changes nothing; `down` leaves no process, mount, network namespace,
# cgroup or iptables rule of the cluster behind, and a warm `up` starts it again. Prints the
# times of each `up`. Ends with the cluster down.
set -euo pipefail
cd "$(dirname "$0")/.."
cluster=scripts/cluster.sh
NETNS=hypersdk-cluster CGROUP=hypersdk-cluster RUN=/run/hypersdk-cluster

fail() { echo "cluster-test: FAIL: $*" >&2; exit 1; }
pass() { echo "cluster-test: ok: $*"; }
in_netns() { nsenter --net="/run/netns/$NETNS" -- "$@"; }

# shellcheck source=scripts/eventually.sh
. scripts/eventually.sh

timed_up() {
  local start=$SECONDS
  "$cluster" up
  echo "cluster-test: $1 up took $((SECONDS - start))s"
}

# What of the machine the cluster could touch (others work on this machine too, so the rest is
# left out): it must be the same after `down` as before `up`.
host_state() {
  local ours='KUBE|CNI|hsdk|hypersdk|cni-|10\.24[34]\.|kubepods|target/cluster'
  {
    iptables-save
    ip netns list
    ip -o link show
    findmnt -rn -o TARGET,SOURCE
    ls /sys/fs/cgroup/*/
  } | grep -E "$ours" | sort || true
  find /var/lib/kubelet /var/lib/cni /run/containerd /var/log/containers 2>/dev/null || true
}

"$cluster" down >/dev/null
before=$(host_state)
timed_up first
eval "$("$cluster" env)"

[ "$(kubectl get node hypersdk-node -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ] ||
  fail "node hypersdk-node is not Ready"
pass "node Ready: $(kubectl get node hypersdk-node -o jsonpath='{.status.nodeInfo.kubeletVersion} {.status.nodeInfo.containerRuntimeVersion}')"

kubectl delete pod smoke --ignore-not-found --wait >/dev/null
kubectl run smoke --image localhost/hypersdk/cluster-check:v1 --image-pull-policy Never \
  --restart Never -- hello from the smoke pod >/dev/null
eventually 120 "pod smoke Ready" kubectl wait --for=condition=Ready pod/smoke --timeout=1s
eventually 30 "pod smoke's log" sh -c 'kubectl logs smoke | grep -qx "hello from the smoke pod"'
ip=$(kubectl get pod smoke -o jsonpath='{.status.podIP}')
case $ip in 10.244.0.*) ;; *) fail "pod address $ip is not in the pod network 10.244.0.0/24" ;; esac
token=$(kubectl get pod smoke -o jsonpath='{.spec.volumes[0].projected.sources[0].serviceAccountToken.path}')
[ "$token" = token ] || fail "pod smoke has no service-account token volume"
uid=$(kubectl get pod smoke -o jsonpath='{.metadata.uid}')
pod_cgroup=$(find "/sys/fs/cgroup/pids/$CGROUP/kubepods" -type d -name "pod$uid")
[ -n "$(cat "$pod_cgroup"/*/cgroup.procs)" ] || fail "no process in the pod's cgroup"
pass "pod smoke runs the imported image at $ip, its process in $pod_cgroup"

kubectl delete pod smoke --wait --timeout=60s >/dev/null
kubectl get pod smoke >/dev/null 2>&1 && fail "pod smoke still exists after delete"
eventually 30 "the pod's cgroup removed" sh -c "[ ! -d '$pod_cgroup' ]"
pass "pod smoke deleted and its cgroup removed"

in_netns curl -fsS --cacert target/cluster/pki/ca.crt https://10.96.0.1/readyz >/dev/null ||
  fail "the API server does not answer at the kubernetes Service 10.96.0.1"
iptables-save | grep -q KUBE- && fail "kube-proxy or the kubelet wrote rules into the machine's iptables"
pass "the kubernetes Service answers through kube-proxy; the machine's iptables has no KUBE- rule"

pids=$(cat "$RUN"/*.pid)
timed_up second
[ "$pids" = "$(cat "$RUN"/*.pid)" ] || fail "a second up restarted components"
pass "a second up kept every component's process"

"$cluster" down
[ -z "$(find "/sys/fs/cgroup/pids/$CGROUP" -name cgroup.procs -exec cat {} + 2>/dev/null)" ] ||
  fail "processes left in cgroup $CGROUP"
for pid in $pids; do [ ! -d "/proc/$pid" ] || fail "process $pid survived down"; done
diff <(echo "$before") <(echo "$(host_state)") || fail "down left the machine different from before up (diff above)"
pass "down stopped everything and gave back the machine's iptables, links, mounts, namespaces and cgroups"

timed_up warm
"$cluster" down >/dev/null
echo "cluster-test: du of target/cluster: $(du -sh target/cluster | cut -f1)"
echo "1 passed, 0 failed"
