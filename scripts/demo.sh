#!/usr/bin/env bash
# The HyperSDK demo: a node agent boots the test guest under QEMU, shows it running with its
# guest agent connected, resizes it in place, survives its own crash without touching the VM,
# pauses and resumes it, stops it gracefully, and cleans up.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --workspace --bins --locked -q

work=$(mktemp -d /tmp/hypersdk-demo.XXXXXX)
agent_pid=""
cleanup() {
  [ -n "$agent_pid" ] && kill "$agent_pid" 2>/dev/null && wait "$agent_pid" 2>/dev/null || true
  # The agent leaves VMs running by design; the demo removes its own.
  pkill -f "guest=demo-vm," 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/images"
cp target/guest/vmlinuz target/guest/initrd.img target/guest/disk.qcow2 "$work/images/"
export HYPERSDK_AGENT="unix://$work/agent.sock"
hyperctl() { target/debug/hyperctl "$@"; }
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

start_agent() {
  target/debug/hypersdk-agent --node-name node-1 --data-dir "$work/data" \
    --listen "$HYPERSDK_AGENT" --image-dir "$work/images" 2>>"$work/agent.log" &
  agent_pid=$!
  for _ in $(seq 100); do hyperctl node info >/dev/null 2>&1 && return; sleep 0.1; done
  echo "the agent did not start; its log:" >&2; cat "$work/agent.log" >&2; exit 1
}

step "Starting a node agent (data in $work)"
start_agent
hyperctl node info

step "Creating and starting demo-vm (1 vCPU, 256Mi, the test guest)"
hyperctl vm create demo-vm --cpus 1 --max-cpus 2 --memory 256Mi --max-memory 512Mi \
  --kernel "$work/images/vmlinuz" --initrd "$work/images/initrd.img" \
  --cmdline "console=ttyS0 quiet memhp_default_state=online_movable tsc=reliable cryptomgr.notests" \
  --disk "$work/images/disk.qcow2" --start

step "Waiting for the guest agent inside the VM to answer"
for _ in $(seq 600); do
  hyperctl vm get demo-vm -o json | grep -q '"agentConnected": true' && break
  sleep 0.1
done
hyperctl vm list
hyperctl vm get demo-vm -o json | grep -E '"(phase|agentConnected|qmpReadyMs|runningMs|agentConnectedMs)"'
echo "serial console:"
tail -n 4 "$work/data/vms/demo-vm/serial.log" | sed 's/^/  | /'

step "Resizing in place: 2 vCPUs and 512Mi (the guest onlines them itself)"
hyperctl vm resize demo-vm --cpus 2 --memory 512Mi | grep -E 'CPUs|Memory|Guest sees'

step "Killing the agent (SIGKILL) and starting a new one: the VM keeps running"
pid_before=$(hyperctl vm get demo-vm -o json | sed -n 's/.*"pid": \([0-9]*\).*/\1/p')
kill -9 "$agent_pid"; wait "$agent_pid" 2>/dev/null || true
start_agent
pid_after=$(hyperctl vm get demo-vm -o json | sed -n 's/.*"pid": \([0-9]*\).*/\1/p')
echo "QEMU pid before: $pid_before, after: $pid_after (adopted, not restarted)"
hyperctl vm list

step "Pausing and resuming"
hyperctl vm pause demo-vm | grep -E 'Phase'
hyperctl vm resume demo-vm | grep -E 'Phase'

step "Stopping gracefully (ACPI power-down; the guest powers itself off)"
hyperctl vm stop demo-vm | grep -E 'Phase|Message'
tail -n 2 "$work/data/vms/demo-vm/serial.log" | sed 's/^/  | /'

step "Deleting"
hyperctl vm delete demo-vm
hyperctl vm list
echo
echo "demo finished"
