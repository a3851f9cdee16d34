#!/usr/bin/env bash
# The HyperSDK demo: two node agents on this machine. The first boots the test guest under QEMU,
# shows it running with its guest agent connected, resizes it in place, survives its own crash
# without touching the VM, live-migrates it to the second agent (the guest keeps counting),
# takes a memory snapshot there and restores it;
# there it is paused and resumed, stopped gracefully and deleted.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --workspace --bins --locked -q

work=$(mktemp -d /tmp/hypersdk-demo.XXXXXX)
agent_pid=()
cleanup() {
  for p in "${agent_pid[@]}"; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null || true; done
  # The agent leaves VMs running by design; the demo removes its own.
  pkill -f "guest=demo-vm," 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/images"
cp target/guest/vmlinuz target/guest/initrd.img target/guest/disk.qcow2 "$work/images/"
node1="unix://$work/node-1.sock"
node2="unix://$work/node-2.sock"
export HYPERSDK_AGENT=$node1
hyperctl() { target/debug/hyperctl "$@"; }
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# start_agent N: node-N with its own data dir; both see the shared image dir (live migration
# needs the disks on shared storage).
start_agent() {
  target/debug/hypersdk-agent --node-name "node-$1" --data-dir "$work/data-$1" \
    --listen "unix://$work/node-$1.sock" --image-dir "$work/images" 2>>"$work/agent-$1.log" &
  agent_pid[$1]=$!
  for _ in $(seq 100); do
    hyperctl --agent "unix://$work/node-$1.sock" node info >/dev/null 2>&1 && return
    sleep 0.1
  done
  echo "agent $1 did not start; its log:" >&2; cat "$work/agent-$1.log" >&2; exit 1
}
serial_tail() { tail -n "$2" "$work/data-$1/vms/demo-vm/serial.log" | sed 's/^/  | /'; }

step "Starting two node agents (data in $work)"
start_agent 1
start_agent 2
hyperctl node info

step "Creating and starting demo-vm (1 vCPU, 256Mi, the test guest)"
hyperctl vm create demo-vm --cpus 1 --max-cpus 2 --memory 256Mi --max-memory 512Mi \
  --kernel "$work/images/vmlinuz" --initrd "$work/images/initrd.img" \
  --cmdline "console=ttyS0 quiet memhp_default_state=online_movable tsc=reliable no_timer_check nohz=off highres=off pti=on cryptomgr.notests" \
  --disk "$work/images/disk.qcow2" --start

step "Waiting for the guest agent inside the VM to answer"
for _ in $(seq 600); do
  hyperctl vm get demo-vm -o json | grep -q '"agentConnected": true' && break
  sleep 0.1
done
hyperctl vm list
hyperctl vm get demo-vm -o json | grep -E '"(phase|agentConnected|qmpReadyMs|runningMs|agentConnectedMs)"'
echo "serial console:"
serial_tail 1 4

step "Resizing in place: 2 vCPUs and 512Mi (the guest onlines them itself)"
hyperctl vm resize demo-vm --cpus 2 --memory 512Mi | grep -E 'CPUs|Memory|Guest sees'

step "Killing the agent (SIGKILL) and starting a new one: the VM keeps running"
pid_before=$(hyperctl vm get demo-vm -o json | sed -n 's/.*"pid": \([0-9]*\).*/\1/p')
kill -9 "${agent_pid[1]}"; wait "${agent_pid[1]}" 2>/dev/null || true
start_agent 1
pid_after=$(hyperctl vm get demo-vm -o json | sed -n 's/.*"pid": \([0-9]*\).*/\1/p')
echo "QEMU pid before: $pid_before, after: $pid_after (adopted, not restarted)"
hyperctl vm list

step "Migrating demo-vm from node-1 to node-2 (live pre-copy on KVM; under TCG the guest pauses for the copy)"
hyperctl vm migrate demo-vm --to "$node2" --wait
echo "node-1 now has:"
hyperctl vm list
export HYPERSDK_AGENT=$node2
echo "node-2 now has:"
hyperctl vm list
sleep 2
echo "the guest kept counting on node-2 (no reboot: no boot messages on its console):"
serial_tail 2 3
hyperctl vm get demo-vm -o json | grep -E '"(phase|node|cpus|memoryBytes)"'

step "Memory snapshot on node-2: the guest pauses while its memory and disks are captured"
hyperctl vm snapshot create demo-vm before --memory
counter_at_snapshot=$(serial_tail 2 1)
sleep 4
echo "the guest counted on: $(serial_tail 2 1)"
step "Restoring the snapshot: the guest goes back to that instant (memory and disk), no reboot"
hyperctl vm snapshot restore demo-vm before
sleep 2
echo "at the snapshot: $counter_at_snapshot; after the restore the guest counts on from there:"
serial_tail 2 3
hyperctl vm snapshot list demo-vm
hyperctl vm snapshot delete demo-vm before

step "Pausing and resuming"
hyperctl vm pause demo-vm | grep -E 'Phase'
hyperctl vm resume demo-vm | grep -E 'Phase'

step "Stopping gracefully (ACPI power-down; the guest powers itself off)"
hyperctl vm stop demo-vm | grep -E 'Phase|Message'
serial_tail 2 2

step "Deleting"
hyperctl vm delete demo-vm
hyperctl vm list
echo
echo "agent demo finished; next, the same through the controller"
scripts/demo-controller.sh
