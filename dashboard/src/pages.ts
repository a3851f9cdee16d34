// The pages: each builds its skeleton once and returns how to update it with a new state.

import { buttons } from "./actions";
import { bars, counts } from "./charts";
import { ago, bytes } from "./format";
import { span, table, type Cell } from "./table";
import type { Operation, State, Vm } from "./types";

export type Update = (s: State) => void;

function heading(main: HTMLElement, text: string): void {
  const h = document.createElement("h1");
  h.textContent = text;
  main.append(h);
}

const phaseOf = (vm: Vm) => vm.status?.phase ?? "Pending";

function phaseCell(phase: string): Cell {
  return { key: phase, node: () => span(phase, `phase phase-${phase}`) };
}

function progressCell(percent: number | undefined, text: string): Cell {
  return {
    key: `${percent}|${text}`,
    node: () => {
      const frag = document.createDocumentFragment();
      if (percent !== undefined) {
        const p = document.createElement("progress");
        p.max = 100;
        p.value = percent;
        p.setAttribute("aria-label", `${text}: ${percent}%`);
        frag.append(p, ` ${percent}% `);
      }
      frag.append(text);
      return frag;
    },
  };
}

function conditions(vm: Vm): Cell {
  const list = vm.status?.conditions ?? [];
  return {
    key: list.map((c) => `${c.type}=${c.status}:${c.reason ?? ""}`).join(","),
    node: () => {
      const frag = document.createDocumentFragment();
      for (const c of list) {
        const b = span(c.type, `badge ${c.status.toLowerCase()}`);
        b.title = `${c.type}: ${c.status}${c.reason ? ` (${c.reason})` : ""}${c.message ? ` — ${c.message}` : ""}`;
        frag.append(b);
      }
      return frag;
    },
  };
}

function ips(vm: Vm): string {
  const list = (vm.status?.interfaces ?? []).flatMap((i) => i.ipAddresses ?? (i.ipAddress ? [i.ipAddress] : []));
  return list.join(", ") || "—";
}

/** The operation under way on `vm`, else its latest. */
function activity(vm: Vm, ops: Operation[]): Cell {
  const mine = ops.filter((o) => o.spec.vmRef.name === vm.metadata.name && o.metadata.namespace === vm.metadata.namespace);
  const migration = vm.live?.migration;
  if (migration && !["Completed", "Failed", "Cancelled", "Unspecified"].includes(migration.phase)) {
    const text = `migrating to ${migration.targetNode}: ${bytes(migration.transferredBytes)} of ${bytes(migration.totalBytes)}`;
    return progressCell(migration.percent, text);
  }
  const open = mine.find((o) => !["Succeeded", "Failed", "Cancelled"].includes(o.status?.phase ?? ""));
  const last = open ?? mine.sort((a, b) => (b.metadata.creationTimestamp ?? "").localeCompare(a.metadata.creationTimestamp ?? ""))[0];
  if (!last) return "—";
  const text = `${last.spec.operation} ${last.status?.phase ?? "Pending"}`;
  return progressCell(open ? last.status?.progress?.percent : undefined, text);
}

function vmCells(vm: Vm, s: State): Cell[] {
  const cpus = vm.live?.guestCpus || vm.status?.cpus;
  const memory = vm.live?.guestMemoryBytes ? bytes(vm.live.guestMemoryBytes) : vm.status?.memory;
  return [
    vm.metadata.name,
    phaseCell(phaseOf(vm)),
    vm.status?.nodeName ?? "—",
    `${cpus ?? "—"} / ${vm.spec.cpus}`,
    `${memory ?? "—"} / ${vm.spec.memory}`,
    ips(vm),
    conditions(vm),
    activity(vm, s.operations),
    { ...buttons(vm, s), className: "actions" },
  ];
}

export function vms(main: HTMLElement): Update {
  heading(main, "Virtual machines");
  const tabs = document.createElement("div");
  tabs.className = "tabs";
  tabs.setAttribute("role", "tablist");
  tabs.setAttribute("aria-label", "Filter");
  let filter = "All";
  let last: State | null = null;
  const t = table(
    [
      { title: "Name", field: "name" },
      { title: "Phase", field: "phase" },
      { title: "Node", field: "node" },
      { title: "vCPUs (now / asked)", field: "cpus", narrow: true },
      { title: "Memory (now / asked)", field: "memory", narrow: true },
      { title: "Guest IPs", field: "ips", narrow: true },
      { title: "Conditions", field: "conditions", narrow: true },
      { title: "Activity", field: "activity" },
      { title: "Actions", field: "actions" },
    ],
    "Virtual machines",
  );
  for (const name of ["All", "Running", "Stopped"]) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = name;
    b.setAttribute("role", "tab");
    b.setAttribute("aria-selected", String(name === filter));
    b.addEventListener("click", () => {
      filter = name;
      for (const o of tabs.children) o.setAttribute("aria-selected", String(o === b));
      if (last) update(last);
    });
    tabs.append(b);
  }
  main.append(tabs, t.root);
  const update = (s: State) => {
    last = s;
    const shown = s.vms.filter((vm) => filter === "All" || phaseOf(vm) === filter);
    t.update(shown.map((vm) => ({ key: `${vm.metadata.namespace}/${vm.metadata.name}`, cells: vmCells(vm, s) })));
  };
  return update;
}

function card(n: string, label: string): HTMLElement {
  const c = document.createElement("div");
  c.className = "card";
  c.append(span(n, "n"), document.createElement("br"), span(label, "l"));
  return c;
}

function statusBars(s: State) {
  return counts(s.vms.map(phaseOf));
}

function byNode(s: State) {
  return counts(s.vms.filter((v) => v.status?.nodeName).map((v) => v.status!.nodeName!));
}

export function overview(main: HTMLElement): Update {
  heading(main, "Overview");
  const cards = document.createElement("div");
  cards.className = "cards";
  const grid = document.createElement("div");
  grid.className = "grid";
  main.append(cards, grid);
  return (s: State) => {
    const running = s.vms.filter((v) => phaseOf(v) === "Running").length;
    const cpus = s.nodes.reduce((a, n) => a + n.cpus, 0);
    const allocated = s.nodes.reduce((a, n) => a + n.allocatedCpus, 0);
    const mem = s.nodes.reduce((a, n) => a + n.memoryBytes, 0);
    const memAllocated = s.nodes.reduce((a, n) => a + n.allocatedMemoryBytes, 0);
    cards.replaceChildren(
      card(String(s.vms.length), "virtual machines"),
      card(String(running), "running"),
      card(String(s.vms.length - running), "not running"),
      card(`${s.nodes.filter((n) => n.reachable).length} / ${s.nodes.length}`, "nodes reachable"),
      card(`${allocated} / ${cpus}`, "vCPUs placed / host CPUs"),
      card(`${bytes(memAllocated)} / ${bytes(mem)}`, "memory placed / host"),
      card(String(s.snapshots.length), "snapshots"),
      card(String(s.operations.filter((o) => !["Succeeded", "Failed", "Cancelled"].includes(o.status?.phase ?? "")).length), "operations under way"),
    );
    grid.replaceChildren(bars("VM status", statusBars(s)), bars("VMs by node", byNode(s)), eventList(s, 10));
  };
}

function eventList(s: State, n: number): HTMLElement {
  const panel = document.createElement("section");
  panel.className = "panel";
  const h = document.createElement("h2");
  h.textContent = "Recent events";
  const ul = document.createElement("ul");
  ul.className = "events";
  for (const e of s.events.slice(0, n)) {
    const li = document.createElement("li");
    li.append(span(`${e.reason ?? ""} `, e.type ?? ""), `${e.kind ?? ""} ${e.name ?? ""}: ${e.note ?? ""} `, span(ago(e.time), "muted"));
    ul.append(li);
  }
  if (!s.events.length) ul.append(span("No events yet", "muted"));
  panel.append(h, ul);
  return panel;
}

export function events(main: HTMLElement): Update {
  heading(main, "Events");
  const holder = document.createElement("div");
  main.append(holder);
  return (s) => holder.replaceChildren(eventList(s, 50));
}

export function charts(main: HTMLElement): Update {
  heading(main, "Charts");
  const grid = document.createElement("div");
  grid.className = "grid";
  main.append(grid);
  return (s: State) => {
    const migrations = s.operations.filter((o) => o.spec.operation === "migrate").map((o) => o.status?.phase ?? "Pending");
    grid.replaceChildren(
      bars("VM status", statusBars(s)),
      bars("VMs by node", byNode(s)),
      bars("vCPUs placed / placeable per node", s.nodes.map((n) => ({ label: n.name, value: n.allocatedCpus, max: n.cpus, text: `${n.allocatedCpus} / ${n.cpus}` }))),
      bars("Memory placed / host memory per node", s.nodes.map((n) => ({ label: n.name, value: n.allocatedMemoryBytes, max: n.memoryBytes, text: `${bytes(n.allocatedMemoryBytes)} / ${bytes(n.memoryBytes)}` }))),
      bars(
        "Carbon intensity per node (gCO2eq/kWh)",
        s.nodes.filter((n) => n.carbonIntensity != null).map((n) => ({ label: n.name, value: n.carbonIntensity!, alt: true })),
        "No node has a carbon intensity (--carbon-intensity NODE=GRAMS)",
      ),
      bars("Migrations by outcome", counts(migrations), "No migrations yet"),
    );
  };
}

export function templates(main: HTMLElement): Update {
  heading(main, "Templates");
  const t = table(
    [
      { title: "Name", field: "name" },
      { title: "Display name", field: "display" },
      { title: "OS", field: "os", narrow: true },
      { title: "Default size", field: "size", narrow: true },
      { title: "Phase", field: "phase" },
      { title: "Used by", field: "usage" },
    ],
    "Templates",
  );
  main.append(t.root);
  return (s) =>
    t.update(
      s.templates.map((tp) => ({
        key: `${tp.metadata.namespace}/${tp.metadata.name}`,
        cells: [
          tp.metadata.name,
          tp.spec.displayName ?? "",
          tp.spec.osType ?? "",
          `${tp.spec.defaultSpec?.cpus ?? "—"} vCPU, ${tp.spec.defaultSpec?.memory ?? "—"}`,
          phaseCell(tp.status?.phase ?? (tp.status?.ready ? "Ready" : "Pending")),
          String(tp.status?.usageCount ?? 0),
        ],
      })),
    );
}

export function snapshots(main: HTMLElement): Update {
  heading(main, "Snapshots");
  const t = table(
    [
      { title: "Name", field: "name" },
      { title: "VM", field: "vm" },
      { title: "Phase", field: "phase" },
      { title: "Memory", field: "memory", narrow: true },
      { title: "Size", field: "size", narrow: true },
      { title: "Description", field: "description", narrow: true },
      { title: "Created", field: "created" },
    ],
    "Snapshots",
  );
  main.append(t.root);
  return (s) =>
    t.update(
      s.snapshots.map((sn) => ({
        key: `${sn.metadata.namespace}/${sn.metadata.name}`,
        cells: [
          sn.metadata.name,
          sn.spec.vmRef.name,
          phaseCell(sn.status?.phase ?? "Pending"),
          sn.spec.includeMemory ? "yes" : "no",
          sn.status?.sizeBytes ? bytes(sn.status.sizeBytes) : "—",
          sn.spec.description ?? "",
          ago(sn.metadata.creationTimestamp),
        ],
      })),
    );
}

export function operations(main: HTMLElement): Update {
  heading(main, "Operations");
  const t = table(
    [
      { title: "Name", field: "name" },
      { title: "VM", field: "vm" },
      { title: "Operation", field: "operation" },
      { title: "Phase", field: "phase" },
      { title: "Progress", field: "progress" },
      { title: "Message", field: "message", narrow: true },
      { title: "Created", field: "created", narrow: true },
    ],
    "Operations",
  );
  main.append(t.root);
  return (s) => {
    const ops = [...s.operations].sort((a, b) => (b.metadata.creationTimestamp ?? "").localeCompare(a.metadata.creationTimestamp ?? ""));
    t.update(
      ops.map((o) => ({
        key: `${o.metadata.namespace}/${o.metadata.name}`,
        cells: [
          o.metadata.name,
          o.spec.vmRef.name,
          o.spec.operation,
          phaseCell(o.status?.phase ?? "Pending"),
          progressCell(o.status?.progress?.percent, o.status?.progress?.stage ?? ""),
          o.status?.message ?? "",
          ago(o.metadata.creationTimestamp),
        ],
      })),
    );
  };
}
