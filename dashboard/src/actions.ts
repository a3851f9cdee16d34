// Buttons that create the VMOperation or VMSnapshot a user would write by hand (POST
// /api/actions); destructive ones ask first. Progress shows in the tables, which follow the
// created objects live.

import { headers } from "./live";
import type { NodeInfo, State, Vm } from "./types";

interface Spec {
  label: string;
  body: Record<string, unknown>;
  /** Asks before acting: the question's text. */
  confirm?: string;
  /** Asks for the migration's target node. */
  pickNode?: boolean;
}

export function toast(text: string, error = false): void {
  const box = document.getElementById("toast")!;
  const div = document.createElement("div");
  div.textContent = text;
  if (error) div.className = "error";
  box.append(div);
  setTimeout(() => div.remove(), error ? 8000 : 4000);
}

async function send(body: Record<string, unknown>): Promise<void> {
  const resp = await fetch("/api/actions", {
    method: "POST",
    headers: { "Content-Type": "application/json", ...headers() },
    body: JSON.stringify(body),
  });
  if (!resp.ok) {
    toast(`Refused (${resp.status}): ${await resp.text()}`, true);
    return;
  }
  const made = (await resp.json()) as { kind: string; name: string };
  toast(`Created ${made.kind} ${made.name}`);
}

/** Shows the confirmation dialog; resolves with the chosen node ("" for any) or null. */
function ask(title: string, text: string, nodes?: NodeInfo[]): Promise<string | null> {
  const dialog = document.getElementById("confirm") as HTMLDialogElement;
  document.getElementById("confirm-title")!.textContent = title;
  document.getElementById("confirm-text")!.textContent = text;
  const extra = document.getElementById("confirm-extra")!;
  extra.replaceChildren();
  let select: HTMLSelectElement | null = null;
  if (nodes) {
    const label = document.createElement("label");
    label.htmlFor = "target-node";
    label.textContent = "Target node";
    select = document.createElement("select");
    select.id = "target-node";
    select.append(new Option("Any node the scheduler picks", ""));
    for (const n of nodes) select.append(new Option(n.name, n.name));
    extra.append(label, select);
  }
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener(
      "close",
      () => resolve(dialog.returnValue === "ok" ? select?.value ?? "" : null),
      { once: true },
    );
  });
}

function specs(vm: Vm): Spec[] {
  const op = (operation: string) => ({ kind: "VMOperation", namespace: vm.metadata.namespace, vm: vm.metadata.name, operation });
  const name = vm.metadata.name;
  const phase = vm.status?.phase ?? "";
  const out: Spec[] = [];
  if (phase === "Stopped" || phase === "Failed" || !vm.spec.running) out.push({ label: "Start", body: op("start") });
  if (phase === "Running" || phase === "Paused") {
    out.push({ label: "Stop", body: op("stop"), confirm: `Stop ${name}? Its guest is powered off.` });
    out.push({ label: "Restart", body: op("restart"), confirm: `Restart ${name}? Its guest reboots.` });
  }
  if (phase === "Running") {
    out.push({ label: "Pause", body: op("pause") });
    out.push({ label: "Migrate", body: op("migrate"), confirm: `Move ${name} to another node while it runs?`, pickNode: true });
    out.push({ label: "Snapshot", body: { kind: "VMSnapshot", namespace: vm.metadata.namespace, vm: name, includeMemory: false } });
  }
  if (phase === "Paused") out.push({ label: "Resume", body: op("resume") });
  return out;
}

/** The action buttons of `vm`: disabled, with the reason, when the dashboard is read-only. */
export function buttons(vm: Vm, state: State): { key: string; node: () => Node } {
  const list = specs(vm);
  const allowed = state.access.actions;
  return {
    key: `${allowed}|${list.map((s) => s.label).join(",")}`,
    node: () => {
      const frag = document.createDocumentFragment();
      for (const s of list) {
        const b = document.createElement("button");
        b.type = "button";
        b.textContent = s.label;
        b.dataset.action = s.label.toLowerCase();
        b.setAttribute("aria-label", `${s.label} ${vm.metadata.name}`);
        if (!allowed) {
          b.disabled = true;
          b.title = "Read-only dashboard (the controller runs without --dashboard-actions)";
        }
        b.addEventListener("click", async () => {
          let body = s.body;
          if (s.confirm) {
            const node = await ask(`${s.label} ${vm.metadata.name}`, s.confirm, s.pickNode ? others(vm, state) : undefined);
            if (node === null) return;
            if (s.pickNode && node) body = { ...body, targetNode: node };
          }
          await send(body);
        });
        frag.append(b);
      }
      return frag;
    },
  };
}

function others(vm: Vm, state: State): NodeInfo[] {
  return state.nodes.filter((n) => n.name !== vm.status?.nodeName && n.reachable);
}
