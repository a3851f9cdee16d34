#!/usr/bin/env bash
# A real one-node Kubernetes for tests and for trying HyperSDK: scripts/cluster.sh up|down|env|status
#   up      builds the pinned components once (scripts/cluster/go.mod) into target/cluster/bin,
#           starts etcd, the control plane, containerd, kubelet and kube-proxy, and waits until the
#           node is Ready and a pod with a locally imported image runs. Does nothing already done.
#   down    stops every process `up` started and removes the cluster's state, mounts, network
#           namespaces and cgroups (binaries, certificates and images stay for the next `up`).
#   env     prints the exports for a shell: eval "$(scripts/cluster.sh env)"
#   status  shows which components run and the node.
# The cluster runs in its own network namespace, reached from the machine at $NODE_IP only, so
# its ports, iptables rules and sysctls stay out of the machine's. Needs root and scripts/setup.sh.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SRC=$ROOT/scripts/cluster
C=$ROOT/target/cluster
BIN=$C/bin PKI=$C/pki ETC=$C/etc LOG=$C/log DATA=$C/data IMAGES=$C/images
RUN=/run/hypersdk-cluster
CONTAINERD_SOCK=$RUN/containerd.sock
NETNS=hypersdk-cluster CGROUP=hypersdk-cluster
HOST_IF=hsdk-host HOST_IP=10.243.0.1 NODE_IF=hsdk-node NODE_IP=10.243.0.2
POD_BRIDGE=hsdk-pods POD_CIDR=10.244.0.0/24 SERVICE_CIDR=10.96.0.0/24 SERVICE_IP=10.96.0.1
NODE=hypersdk-node
# pinned MODULE: the version scripts/cluster/go.mod requires.
pinned() { sed -n "s|^\t$1 \(v[^ ]*\).*|\1|p" "$SRC/go.mod"; }
K8S_VERSION=$(pinned k8s.io/kubernetes) HELM_VERSION=$(pinned helm.sh/helm/v3)
PAUSE_IMAGE=localhost/hypersdk/pause:3.10
CHECK_IMAGE=localhost/hypersdk/cluster-check:v1
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl helm)
# The kubelet sets these machine-wide on start; `down` puts back the values they had before.
KERNEL_TUNABLES=(vm/overcommit_memory vm/panic_on_oom kernel/panic kernel/panic_on_oops)

# shellcheck source=scripts/cluster/pki.sh
. "$SRC/pki.sh"
# shellcheck source=scripts/cluster/config.sh
. "$SRC/config.sh"
# shellcheck source=scripts/cluster/processes.sh
. "$SRC/processes.sh"

say() { echo "cluster: $*"; }
die() { echo "cluster: error: $*" >&2; exit 1; }
in_netns() { nsenter --net="/run/netns/$NETNS" -- "$@"; }
kctl() { "$BIN/kubectl" --kubeconfig "$ETC/admin.kubeconfig" "$@"; }

# wait_until WHAT SECONDS COMMAND...: polls COMMAND every second, saying it still waits every 10 s.
wait_until() {
  local what=$1 bound=$2 start=$SECONDS told=$SECONDS
  shift 2
  until "$@" >/dev/null 2>&1; do
    [ $((SECONDS - start)) -lt "$bound" ] || die "$what not reached after ${bound}s (logs: $LOG)"
    if [ $((SECONDS - told)) -ge 10 ]; then
      told=$SECONDS
      say "  still waiting for $what ($((SECONDS - start))s)"
    fi
    sleep 1
  done
}

check_tools() {
  local missing=()
  for tool in containerd runc ctr iptables conntrack openssl jq nsenter findmnt curl go; do
    command -v "$tool" >/dev/null || missing+=("$tool")
  done
  [ -x /usr/lib/cni/bridge ] || missing+=(/usr/lib/cni/bridge)
  [ ${#missing[@]} -eq 0 ] || die "missing ${missing[*]}: run scripts/setup.sh"
  [ "$(id -u)" -eq 0 ] || die "needs root (network namespace, mounts, cgroups)"
}

# ldflags: the linker flags of every binary: stripped, with the pinned versions they report.
ldflags() {
  local flags version_pkg
  flags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  for version_pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    flags+=" -X $version_pkg.gitVersion=$K8S_VERSION -X $version_pkg.gitMajor=1"
    flags+=" -X $version_pkg.gitMinor=$(echo "$K8S_VERSION" | cut -d. -f2) -X $version_pkg.gitTreeState=clean"
  done
  echo "$flags"
}

# build_stamp: what the binaries depend on; a change rebuilds them.
build_stamp() {
  { cat "$SRC/go.mod" "$SRC/go.sum" "$SRC/pause/main.go"; ldflags; go version; } |
    sha256sum | cut -d' ' -f1
}

# build_one NAME PACKAGE: compiles one binary, printing progress every 100 packages or minute.
build_one() {
  local name=$1 pkg=$2 started=$SECONDS
  (cd "$SRC" && CGO_ENABLED=0 nice -n 19 go build -v -trimpath -ldflags "$(ldflags)" \
    -o "$BIN.new/$name" "$pkg") 2>"$LOG/build-$name.log" &
  local pid=$! count=0 shown=0 told=$SECONDS
  while kill -0 "$pid" 2>/dev/null; do
    sleep 5
    count=$(wc -l <"$LOG/build-$name.log")
    if [ $((count / 100)) -gt "$shown" ] || [ $((SECONDS - told)) -ge 60 ]; then
      shown=$((count / 100)) told=$SECONDS
      say "  $name: $count packages compiled, still building ($((SECONDS - started))s)"
    fi
  done
  wait "$pid" || { tail -n 30 "$LOG/build-$name.log" >&2; die "building $name failed"; }
  say "  $name built in $((SECONDS - started))s"
}

build() {
  local stamp
  stamp=$(build_stamp)
  if [ -f "$BIN/.stamp" ] && [ "$(cat "$BIN/.stamp")" = "$stamp" ]; then
    say "binaries are up to date in $BIN"
    return
  fi
  say "building Kubernetes $K8S_VERSION, etcd and helm from the Go module proxy into $BIN"
  say "(a first build takes tens of minutes on 2 cores; later ones reuse Go's build cache)"
  rm -rf "$BIN.new"
  mkdir -p "$BIN.new" "$LOG"
  local name
  for name in "${COMPONENTS[@]}"; do
    case $name in
    etcd) build_one etcd go.etcd.io/etcd/server/v3 ;;
    helm) build_one helm helm.sh/helm/v3/cmd/helm ;;
    *) build_one "$name" "k8s.io/kubernetes/cmd/$name" ;;
    esac
  done
  build_one pause ./pause
  echo "$stamp" >"$BIN.new/.stamp"
  rm -rf "$BIN"
  mv "$BIN.new" "$BIN"
}

# images: the pause image that every pod's sandbox runs, and the image of the check pod.
images() {
  [ "$BIN/pause" -ot "$IMAGES/pause.tar" ] && [ "$ROOT/scripts/oci-archive.sh" -ot "$IMAGES/pause.tar" ] &&
    return
  say "packing $PAUSE_IMAGE and $CHECK_IMAGE into $IMAGES"
  local rootfs
  rootfs=$(mktemp -d)
  cp "$BIN/pause" "$rootfs/pause"
  "$ROOT/scripts/oci-archive.sh" "$rootfs" "$PAUSE_IMAGE" "$IMAGES/pause.tar" /pause
  "$ROOT/scripts/oci-archive.sh" "$rootfs" "$CHECK_IMAGE" "$IMAGES/cluster-check.tar" /pause
  rm -rf "$rootfs"
}

# network: the cluster's namespace, joined to the machine by a veth pair.
network() {
  [ -e "/run/netns/$NETNS" ] && return
  say "creating network namespace $NETNS ($HOST_IF $HOST_IP <-> $NODE_IF $NODE_IP)"
  ip netns add "$NETNS"
  ip link add "$HOST_IF" type veth peer name "$NODE_IF" netns "$NETNS"
  ip addr add "$HOST_IP/24" dev "$HOST_IF"
  ip link set "$HOST_IF" up
  in_netns ip addr add "$NODE_IP/24" dev "$NODE_IF"
  in_netns ip link set "$NODE_IF" up
  in_netns ip link set lo up
  # Service addresses need a route before kube-proxy's DNAT applies to the node's own traffic
  # (hostNetwork pods); the machine forwards nothing further.
  in_netns ip route add default via "$HOST_IP"
  # Both are per network namespace: they change nothing outside the cluster's.
  in_netns sysctl -q -w net.ipv4.ip_forward=1
  in_netns sysctl -q -w net.bridge.bridge-nf-call-iptables=1
}

save_kernel_tunables() {
  [ -f "$RUN/kernel-tunables" ] && return
  local key
  for key in "${KERNEL_TUNABLES[@]}"; do echo "$key $(cat "/proc/sys/$key")"; done >"$RUN/kernel-tunables"
}

start_control_plane() {
  start etcd "$BIN/etcd" --name "$NODE" --data-dir "$DATA/etcd" \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster "$NODE=http://127.0.0.1:2380" --listen-metrics-urls http://127.0.0.1:2381
  wait_until "etcd health" 60 in_netns curl -fsS http://127.0.0.1:2381/health
  start kube-apiserver "$BIN/kube-apiserver" --etcd-servers http://127.0.0.1:2379 \
    --bind-address "$NODE_IP" --advertise-address "$NODE_IP" --secure-port 6443 \
    --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
    --client-ca-file "$PKI/ca.crt" --authorization-mode Node,RBAC \
    --enable-admission-plugins NodeRestriction --allow-privileged \
    --service-cluster-ip-range "$SERVICE_CIDR" \
    --service-account-issuer https://kubernetes.default.svc \
    --service-account-key-file "$PKI/sa.pub" --service-account-signing-key-file "$PKI/sa.key" \
    --kubelet-client-certificate "$PKI/apiserver-kubelet-client.crt" \
    --kubelet-client-key "$PKI/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority "$PKI/ca.crt" --kubelet-preferred-address-types InternalIP \
    --profiling=false
  wait_until "the API server to be ready" 120 kctl get --raw /readyz
  start kube-controller-manager "$BIN/kube-controller-manager" \
    --kubeconfig "$ETC/controller-manager.kubeconfig" \
    --authentication-kubeconfig "$ETC/controller-manager.kubeconfig" \
    --authorization-kubeconfig "$ETC/controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --leader-elect=false --use-service-account-credentials \
    --service-account-private-key-file "$PKI/sa.key" --root-ca-file "$PKI/ca.crt" \
    --cluster-signing-cert-file "$PKI/ca.crt" --cluster-signing-key-file "$PKI/ca.key" \
    --service-cluster-ip-range "$SERVICE_CIDR" --profiling=false
  start kube-scheduler "$BIN/kube-scheduler" --kubeconfig "$ETC/scheduler.kubeconfig" \
    --authentication-kubeconfig "$ETC/scheduler.kubeconfig" \
    --authorization-kubeconfig "$ETC/scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --leader-elect=false --profiling=false
}

start_node() {
  start containerd containerd --config "$ETC/containerd.toml"
  wait_until "containerd" 60 ctr --address "$CONTAINERD_SOCK" version
  import_image "$PAUSE_IMAGE" "$IMAGES/pause.tar"
  import_image "$CHECK_IMAGE" "$IMAGES/cluster-check.tar"
  save_kernel_tunables
  start kubelet "$BIN/kubelet" --config "$ETC/kubelet.yaml" \
    --kubeconfig "$ETC/kubelet.kubeconfig" --hostname-override "$NODE" --node-ip "$NODE_IP" \
    --root-dir "$DATA/kubelet"
  start kube-proxy "$BIN/kube-proxy" --config "$ETC/kube-proxy.yaml"
  wait_until "node $NODE to register" 120 kctl get node "$NODE"
  wait_until "node $NODE to be Ready" 120 kctl wait --for=condition=Ready "node/$NODE" --timeout=1s
}

import_image() {
  local name=$1 archive=$2
  ctr --address "$CONTAINERD_SOCK" -n k8s.io images ls -q | grep -qxF "$name" && return
  say "importing $name into containerd"
  ctr --address "$CONTAINERD_SOCK" -n k8s.io images import "$archive" >/dev/null
}

# check_pod: a pod with a locally imported image runs, prints, and is deleted.
check_pod() {
  say "running a check pod with $CHECK_IMAGE"
  wait_until "the default service account" 60 kctl get serviceaccount default
  kctl delete pod cluster-check --ignore-not-found --grace-period=0 --force >/dev/null 2>&1
  kctl run cluster-check --image "$CHECK_IMAGE" --image-pull-policy Never --restart Never \
    -- cluster-check-ran >/dev/null
  wait_until "the check pod to run" 120 kctl wait --for=condition=Ready pod/cluster-check --timeout=1s
  wait_until "the check pod's log" 30 sh -c "'$BIN/kubectl' --kubeconfig '$ETC/admin.kubeconfig' logs cluster-check | grep -q cluster-check-ran"
  kctl delete pod cluster-check --wait=false >/dev/null
}

up() {
  local started=$SECONDS
  check_tools
  mkdir -p "$C" "$LOG" "$DATA" "$IMAGES" "$RUN"
  build
  images
  make_pki
  write_configs
  network
  cgroups
  start_control_plane
  start_node
  check_pod
  say "up in $((SECONDS - started))s: node $NODE is Ready; eval \"\$(scripts/cluster.sh env)\""
}

env_exports() {
  echo "export KUBECONFIG=$ETC/admin.kubeconfig"
  echo "export PATH=$BIN:\$PATH"
}

status() {
  local name
  for name in "${COMPONENTS[@]:0:6}" containerd; do
    if running "$name"; then echo "$name: running (pid $(cat "$RUN/$name.pid"))"; else echo "$name: stopped"; fi
  done
  running kube-apiserver && kctl get nodes -o wide
  return 0
}

case ${1:-} in
up) up ;;
down) down ;;
env) env_exports ;;
status) status ;;
*) echo "usage: $0 up|down|env|status" >&2; exit 2 ;;
esac
