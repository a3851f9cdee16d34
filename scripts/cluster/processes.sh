# Processes, cgroups, mounts and namespaces of the cluster; sourced by scripts/cluster.sh.
# Every process it starts runs in the network namespace $NETNS and in the pids cgroup
# $CGROUP/daemons; containerd's shims inherit that cgroup and the kubelet puts pods under
# $CGROUP/kubepods, so `down` finds all that the cluster runs in one cgroup tree.

hierarchies() { ls -d /sys/fs/cgroup/*/; }

cgroups() {
  local h dir
  for h in $(hierarchies); do
    for dir in "$h$CGROUP" "$h$CGROUP/daemons"; do
      mkdir -p "$dir"
      # A v1 cpuset takes no process until it has CPUs and memory nodes.
      if [ -f "$dir/cpuset.cpus" ] && [ -z "$(cat "$dir/cpuset.cpus")" ]; then
        cat "$(dirname "$dir")/cpuset.cpus" >"$dir/cpuset.cpus"
        cat "$(dirname "$dir")/cpuset.mems" >"$dir/cpuset.mems"
      fi
    done
  done
}

# running NAME: the process recorded for NAME is alive and is the cluster's.
running() {
  local pid
  pid=$(cat "$RUN/$1.pid" 2>/dev/null) || return 1
  grep -qs ":pids:/$CGROUP/daemons\$" "/proc/$pid/cgroup"
}

# start NAME COMMAND...: runs COMMAND in the cluster's network namespace and cgroup, detached,
# logging to $LOG/NAME.log; does nothing when NAME already runs.
start() {
  local name=$1
  shift
  if running "$name"; then
    say "$name is running (pid $(cat "$RUN/$name.pid"))"
    return
  fi
  say "starting $name (log: $LOG/$name.log)"
  # shellcheck disable=SC2016 # expanded by the inner shell, which then becomes COMMAND
  nsenter --net="/run/netns/$NETNS" -- setsid sh -c 'echo $$ >"$0" && exec "$@"' \
    "/sys/fs/cgroup/pids/$CGROUP/daemons/cgroup.procs" "$@" >>"$LOG/$name.log" 2>&1 </dev/null &
  echo $! >"$RUN/$name.pid"
}

# stop NAME...: SIGTERM to each at once, then SIGKILL to those alive after 15 s.
stop() {
  local name pids=() waited=0
  for name in "$@"; do
    if running "$name"; then
      pids+=("$(cat "$RUN/$name.pid")")
      say "stopping $name (pid ${pids[-1]})"
    fi
    rm -f "$RUN/$name.pid"
  done
  [ ${#pids[@]} -gt 0 ] || return 0
  kill -TERM "${pids[@]}" 2>/dev/null || true
  while [ "$waited" -lt 150 ] && kill -0 "${pids[@]}" 2>/dev/null; do
    sleep 0.1
    waited=$((waited + 1))
  done
  kill -KILL "${pids[@]}" 2>/dev/null || true
}

# cgroup_pids: every process left in the cluster's cgroup tree.
cgroup_pids() {
  local tree
  tree=/sys/fs/cgroup/pids/$CGROUP
  [ -d "$tree" ] || return 0
  find "$tree" -name cgroup.procs -exec cat {} +
}

kill_the_rest() {
  local pids tries=0
  pids=$(cgroup_pids)
  [ -z "$pids" ] || say "killing what is left in cgroup $CGROUP: $(echo $pids)"
  while [ -n "$pids" ] && [ "$tries" -lt 50 ]; do
    # shellcheck disable=SC2086 # one pid a word
    kill -KILL $pids 2>/dev/null || true
    sleep 0.2
    tries=$((tries + 1))
    pids=$(cgroup_pids)
  done
  [ -z "$pids" ] || die "processes $pids in cgroup $CGROUP survived SIGKILL"
}

# pod_netns: the network namespaces that containerd made for the pods' sandboxes.
pod_netns() {
  cat "$RUN"/containerd/io.containerd.runtime.v2.task/k8s.io/*/config.json 2>/dev/null |
    grep -o '/var/run/netns/cni-[0-9a-f-]*' | sort -u || true
}

unmount_all() {
  local target
  findmnt -rn -o TARGET | { grep -E "^($C|$RUN)/" || true; } | sort -r | while read -r target; do
    umount "$target" 2>/dev/null || umount -l "$target"
  done
}

remove_cgroups() {
  local h
  for h in $(hierarchies); do
    [ -d "$h$CGROUP" ] && find "$h$CGROUP" -depth -type d -exec rmdir {} + 2>/dev/null
  done
  return 0
}

restore_kernel_tunables() {
  [ -f "$RUN/kernel-tunables" ] || return 0
  local key value
  while read -r key value; do echo "$value" >"/proc/sys/$key"; done <"$RUN/kernel-tunables"
}

down() {
  local name netns tasks
  check_tools
  netns=$(pod_netns)
  tasks=$(ls "$RUN/containerd/io.containerd.runtime.v2.task/k8s.io" 2>/dev/null || true)
  # The API server's graceful shutdown waits for etcd: etcd stops last.
  stop kube-proxy kubelet kube-scheduler kube-controller-manager containerd
  stop kube-apiserver
  stop etcd
  kill_the_rest
  unmount_all
  for name in $netns; do
    umount "$name" 2>/dev/null || true
    rm -f "$name"
  done
  if [ -e "/run/netns/$NETNS" ]; then
    say "removing network namespace $NETNS"
    ip netns del "$NETNS"
  fi
  remove_cgroups
  restore_kernel_tunables
  find /var/log/containers -maxdepth 1 -lname "$DATA/*" -delete 2>/dev/null || true
  # Paths that containerd 1.6 and the kubelet use whatever they are told: what is the cluster's
  # goes, then each directory if it is empty.
  for name in $tasks; do
    rm -f "/run/containerd/s/$(printf %s "$CONTAINERD_SOCK/k8s.io/$name" | sha256sum | cut -d' ' -f1)" \
      "/var/lib/cni/results/hypersdk-cluster-$name-eth0" "/var/lib/cni/results/cni-loopback-$name-lo"
  done
  rm -f /var/lib/kubelet/device-plugins/kubelet.sock
  rmdir /var/lib/cni/results /var/lib/cni /var/lib/kubelet/device-plugins /var/lib/kubelet \
    /run/containerd/s /run/containerd 2>/dev/null || true
  rm -rf "$DATA" "$RUN"
  say "down: nothing of the cluster runs; its binaries, certificates and images stay in $C"
}
