#!/usr/bin/env bash
# End-to-end test of HyperSDK on a real Kubernetes (the one-node cluster of scripts/cluster.sh),
# installed the way users install it:
#   cluster up; images built and imported; the chart's rendered manifests checked against it;
#   `helm install hypersdk deploy/helm/hypersdk -n hypersdk-system --create-namespace`; one of
#   the 2 controller replicas leads, and when its pod is deleted the other takes over;
#   bad manifests refused by the API server with the schema's message; the example VMTemplate
#   (its image pointed at the test guest) and the seed VM deploy/examples/vm-my-vm.yaml applied
#   with kubectl, unchanged; the VM reaches Running with its guest agent connected and
#   `kubectl get vm` shows it; `kubectl delete pod` of the agent leaves the same QEMU running and
#   the new agent pod reports the VM Running; `helm upgrade` to a new image tag replaces the
#   agent pod and the same QEMU keeps running; `kubectl delete vm` ends QEMU; `helm uninstall`
#   leaves no HyperSDK process or object.
# Prints the time of each phase. Leaves the cluster up (scripts/cluster.sh down stops it).
# Needs root, scripts/setup.sh and target/guest (scripts/setup.sh builds it).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
NS=hypersdk-system
NODE=hypersdk-node
GUEST=$ROOT/target/guest
WORK=$ROOT/target/k8s-e2e
DATA=$WORK/data
# The cluster's cgroup: `scripts/cluster.sh down` ends whatever is left in it.
VM_CGROUP=hypersdk-cluster/vms
GUEST_CMDLINE="console=ttyS0 quiet tsc=reliable no_timer_check nohz=off highres=off pti=on cryptomgr.notests"

say() { echo "k8s-e2e: $*"; }
fail() {
  echo "k8s-e2e: FAIL: $*" >&2
  if command -v kubectl >/dev/null && [ -n "${KUBECONFIG:-}" ]; then
    kubectl -n "$NS" get pods -o wide >&2 || true
    kubectl get vm -A >&2 || true
    for pod in $(kubectl -n "$NS" get pods -o name 2>/dev/null); do
      echo "--- logs of $pod" >&2
      kubectl -n "$NS" logs "$pod" --all-containers --tail=40 >&2 || true
    done
  fi
  exit 1
}
pass() { echo "k8s-e2e: ok: $*"; }

# shellcheck source=scripts/eventually.sh
. scripts/eventually.sh

PHASES=()
phase_start=$SECONDS
# phase NAME: ends the phase that ran since the last call, recording its time.
phase() {
  local took=$((SECONDS - phase_start))
  PHASES+=("$(printf '%-34s %4ss' "$1" "$took")")
  say "phase '$1' took ${took}s"
  phase_start=$SECONDS
}

vm_field() { kubectl get vm my-vm -n default -o jsonpath="$1" 2>/dev/null; }
vm_phase_is() { [ "$(vm_field '{.status.phase}')" = "$1" ]; }
guest_agent_connected() {
  [ "$(vm_field '{.status.conditions[?(@.type=="AgentConnected")].status}')" = True ]
}
# qemu_pids: the QEMU processes of this test's VMs (their files are under $DATA).
qemu_pids() { pgrep -f "qemu-system.*$DATA/" || true; }
alive() { [ -e "/proc/$1" ] && ! grep -q '^[^)]*) Z' "/proc/$1/stat" 2>/dev/null; }
agent_pod() {
  kubectl -n "$NS" get pods -l app.kubernetes.io/name=hypersdk-agent \
    --field-selector status.phase=Running -o jsonpath='{.items[0].metadata.name}'
}
agent_pod_ready() {
  local pod=$1
  [ "$(kubectl -n "$NS" get pod "$pod" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ]
}
# agent_reports POD PHASE: the agent in POD reports my-vm in PHASE (over its unix socket).
agent_reports() {
  kubectl -n "$NS" exec "$1" -c agent -- hyperctl --agent "unix://$DATA/agent.sock" vm list |
    grep -E "my-vm.*$2"
}

# --- cluster, images, chart -------------------------------------------------------------------
scripts/cluster.sh up
eval "$(scripts/cluster.sh env)"
phase "cluster up"

scripts/images.sh --import
phase "images built and imported"

scripts/manifests.sh --check
phase "rendered manifests match the chart"

# A previous run's leftovers, if it failed half-way.
helm uninstall hypersdk -n "$NS" --wait >/dev/null 2>&1 || true
kubectl delete vm,vmtemplate --all -n default --wait=false >/dev/null 2>&1 || true
for pid in $(qemu_pids); do kill -9 "$pid"; done
rm -rf "$WORK"
mkdir -p "$DATA"

kubectl label node "$NODE" hypersdk.io/kvm=true --overwrite >/dev/null
helm install hypersdk deploy/helm/hypersdk -n "$NS" --create-namespace --wait --timeout 5m \
  --set agent.dataDir="$DATA" --set "agent.imageDirs={$GUEST}" --set agent.vmCgroup="$VM_CGROUP" \
  --set controller.memoryOvercommit=4 ||
  fail "helm install"
kubectl -n "$NS" rollout status deployment/hypersdk-controller --timeout=120s >/dev/null ||
  fail "the controller Deployment is not available"
pass "helm install: $(kubectl -n "$NS" get pods --no-headers | wc -l) pods Ready"
phase "helm install (--wait)"

# Exactly one replica leads.
leaders() {
  local pod n=0
  for pod in $(kubectl -n "$NS" get pods -l app.kubernetes.io/name=hypersdk-controller -o name); do
    kubectl -n "$NS" get --raw "/api/v1/namespaces/$NS/${pod/\//s/}:8080/proxy/metrics" |
      grep -qx 'hypersdk_leader 1' && n=$((n + 1))
  done
  [ "$n" = 1 ]
}
eventually 60 "exactly one controller replica leads" leaders
holder() { kubectl -n "$NS" get lease hypersdk-controller -o jsonpath='{.spec.holderIdentity}'; }
first=$(holder)
pass "one of $(kubectl -n "$NS" get deploy hypersdk-controller -o jsonpath='{.status.readyReplicas}') controller replicas leads (Lease held by $first)"
phase "one leader"

# The leader goes: the other replica takes the Lease once it expires (15 s).
kubectl -n "$NS" delete pod "$first" --wait=false >/dev/null
taken_over() { local h; h=$(holder) && [ -n "$h" ] && [ "$h" != "$first" ]; }
eventually 60 "another replica takes the Lease from $first" taken_over
pass "leader $first deleted: $(holder) leads"
eventually 60 "exactly one controller replica leads" leaders
kubectl -n "$NS" rollout status deployment/hypersdk-controller --timeout=120s >/dev/null ||
  fail "the controller Deployment did not recover its 2 replicas"
phase "leader deleted, another leads"

# --- bad input through the real API server ----------------------------------------------------
# refused FILE MESSAGE: kubectl apply of FILE fails, saying MESSAGE.
refused() {
  local out
  if out=$(kubectl apply -f "$1" 2>&1); then fail "$1 was accepted"; fi
  grep -qF "$2" <<<"$out" || fail "$1 refused without \"$2\": $out"
  pass "refused: $(grep -oF "$2" <<<"$out" | head -n1)"
}
sed '/^  cpus:/d' deploy/examples/vm-my-vm.yaml >"$WORK/no-cpus.yaml"
refused "$WORK/no-cpus.yaml" 'spec.cpus: Required value'
sed 's/^  memory: .*/  memory: "8XB"/' deploy/examples/vm-my-vm.yaml >"$WORK/bad-memory.yaml"
refused "$WORK/bad-memory.yaml" 'spec.memory: Invalid value: "8XB"'
phase "bad manifests refused"

# --- the seed VM ------------------------------------------------------------------------------
sed -e "s|/var/lib/hypersdk/images/ubuntu-22.04|$GUEST|" \
  -e "s|cmdline: .*|cmdline: \"$GUEST_CMDLINE\"|" deploy/examples/vmtemplate-ubuntu.yaml \
  >"$WORK/template.yaml"
kubectl apply -f "$WORK/template.yaml" >/dev/null
kubectl apply -f deploy/examples/vm-my-vm.yaml >/dev/null
eventually 300 "my-vm Running" vm_phase_is Running
phase "VM applied -> Running"
eventually 300 "my-vm's guest agent connected" guest_agent_connected
phase "guest agent connected"
kubectl get vm -n default | tee "$WORK/get-vm.txt"
grep -qE "^my-vm +Running +$NODE +4 +8Gi" "$WORK/get-vm.txt" ||
  fail "kubectl get vm does not show my-vm Running on $NODE with 4 CPUs and 8Gi"
pids=$(qemu_pids)
[ "$(wc -w <<<"$pids")" = 1 ] || fail "expected one QEMU of my-vm, found: ${pids:-none}"
qemu=$pids
# Outside the agent's container: in the host cgroup, running the node's QEMU binary.
grep -q ":pids:/$VM_CGROUP\$" "/proc/$qemu/cgroup" ||
  fail "QEMU $qemu is not in the host cgroup $VM_CGROUP: $(grep pids "/proc/$qemu/cgroup")"
[ "$(readlink "/proc/$qemu/exe")" = "$(readlink -f "$(command -v qemu-system-x86_64)")" ] ||
  fail "QEMU $qemu runs $(readlink "/proc/$qemu/exe"), not the node's binary"
[ "$(readlink "/proc/$qemu/ns/mnt")" = "$(readlink /proc/$$/ns/mnt)" ] ||
  fail "QEMU $qemu is not in the node's mount namespace"
pass "QEMU pid $qemu: node's binary, node's mount namespace, cgroup $VM_CGROUP"

# --- the agent pod goes, the VM stays ---------------------------------------------------------
old=$(agent_pod)
kubectl -n "$NS" delete pod "$old" --wait=true >/dev/null
alive "$qemu" || fail "QEMU $qemu ended with the agent pod $old"
new_agent() { local p; p=$(agent_pod) && [ -n "$p" ] && [ "$p" != "$old" ] && agent_pod_ready "$p"; }
eventually 180 "a new agent pod Ready" new_agent
new=$(agent_pod)
eventually 60 "agent pod $new reports my-vm Running" agent_reports "$new" Running
alive "$qemu" || fail "QEMU $qemu is gone"
[ "$(qemu_pids)" = "$qemu" ] || fail "QEMU pids changed: $(qemu_pids) (was $qemu)"
vm_phase_is Running || fail "my-vm is $(vm_field '{.status.phase}') after the agent pod changed"
pass "agent pod $old deleted: QEMU $qemu kept running, agent pod $new adopted it"
phase "agent pod replaced, VM adopted"

# --- helm upgrade to a new image tag: agent pods replaced, the VM untouched ---------------------
UPGRADE_TAG=$(sed -n 's/^appVersion: "\(.*\)"/\1/p' deploy/helm/hypersdk/Chart.yaml)-upgrade
HYPERSDK_IMAGE_TAG=$UPGRADE_TAG scripts/images.sh --import >/dev/null
helm upgrade hypersdk deploy/helm/hypersdk -n "$NS" --reuse-values --set image.tag="$UPGRADE_TAG" \
  --wait --timeout 5m >/dev/null || fail "helm upgrade to $UPGRADE_TAG"
kubectl -n "$NS" rollout status daemonset/hypersdk-agent --timeout=120s >/dev/null ||
  fail "the agent DaemonSet did not roll to $UPGRADE_TAG"
upgraded=$(agent_pod)
[ "$(kubectl -n "$NS" get pod "$upgraded" -o jsonpath='{.spec.containers[0].image}')" = \
  "localhost/hypersdk/hypersdk-agent:$UPGRADE_TAG" ] || fail "agent pod $upgraded runs the old image"
eventually 60 "agent pod $upgraded reports my-vm Running" agent_reports "$upgraded" Running
[ "$(qemu_pids)" = "$qemu" ] || fail "QEMU pids changed over the upgrade: $(qemu_pids) (was $qemu)"
vm_phase_is Running || fail "my-vm is $(vm_field '{.status.phase}') after the upgrade"
pass "helm upgrade to $UPGRADE_TAG: agent pod $upgraded adopted QEMU $qemu"
phase "helm upgrade, VM untouched"

# --- delete the VM, uninstall -----------------------------------------------------------------
kubectl delete vm my-vm -n default --wait=true --timeout=120s >/dev/null || fail "kubectl delete vm"
qemu_gone() { ! alive "$qemu"; }
eventually 60 "QEMU $qemu gone" qemu_gone
pass "kubectl delete vm: QEMU $qemu ended"
phase "VM deleted, QEMU gone"

kubectl delete vmtemplate ubuntu-22-04-template -n default >/dev/null
helm uninstall hypersdk -n "$NS" --wait --timeout 3m >/dev/null || fail "helm uninstall"
nothing_in_namespace() {
  local left
  left=$(kubectl -n "$NS" get all,secrets,configmaps,leases,serviceaccounts,roles,rolebindings \
    -o name 2>/dev/null | grep -vE '^(configmap/kube-root-ca.crt|serviceaccount/default)$' || true)
  [ -z "$left" ]
}
eventually 120 "no HyperSDK object left in $NS" nothing_in_namespace
[ -z "$(kubectl get clusterroles,clusterrolebindings -o name | grep hypersdk)" ] ||
  fail "cluster roles left: $(kubectl get clusterroles,clusterrolebindings -o name | grep hypersdk)"
[ -z "$(kubectl get csr -o name | grep hypersdk)" ] ||
  fail "certificate signing requests left: $(kubectl get csr -o name | grep hypersdk)"
# cluster_processes: HyperSDK processes the cluster runs (others may run tests on this machine).
cluster_processes() {
  local pid
  for pid in $(pgrep -f "hypersdk-(agent|controller)" || true); do
    grep -qs ":pids:/hypersdk-cluster/" "/proc/$pid/cgroup" && echo "$pid"
  done
  qemu_pids
}
no_processes() { [ -z "$(cluster_processes)" ]; }
eventually 60 "no HyperSDK process left" no_processes
pass "helm uninstall: no HyperSDK process, no object in $NS, no cluster role, no CSR"
# Helm never deletes the CRDs of a chart's crds/ (they hold the users' objects): removed here.
kubectl delete -f deploy/crds >/dev/null
kubectl label node "$NODE" hypersdk.io/kvm- >/dev/null
phase "helm uninstall, clean"

say "phase times:"
printf '  %s\n' "${PHASES[@]}"
say "PASS"
