// Hand-drawn SVG charts: horizontal bars, each with its value written out, and a label for
// screen readers summarising the chart.

export interface Bar {
  label: string;
  value: number;
  /** Draws a track up to `max` behind the bar (e.g. allocatable behind allocated). */
  max?: number;
  text?: string;
  alt?: boolean;
}

const NS = "http://www.w3.org/2000/svg";

function el(name: string, attrs: Record<string, string | number>, text?: string): SVGElement {
  const e = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}

/** A bar chart in a panel titled `title`; `empty` when there is nothing to show. */
export function bars(title: string, items: Bar[], empty = "No data yet"): HTMLElement {
  const panel = document.createElement("section");
  panel.className = "panel chart";
  const h = document.createElement("h2");
  h.textContent = title;
  panel.append(h);
  if (!items.length) {
    const p = document.createElement("p");
    p.className = "muted";
    p.textContent = empty;
    panel.append(p);
    return panel;
  }
  const row = 26, labelW = 130, valueW = 120, width = 520;
  const barW = width - labelW - valueW;
  const top = Math.max(1, ...items.map((i) => Math.max(i.value, i.max ?? 0)));
  const svg = el("svg", { viewBox: `0 0 ${width} ${items.length * row + 4}`, role: "img" });
  svg.setAttribute("aria-label", `${title}: ` + items.map((i) => `${i.label} ${i.text ?? i.value}`).join(", "));
  items.forEach((item, n) => {
    const y = n * row + 4;
    svg.append(el("text", { x: 0, y: y + 14 }, item.label.length > 18 ? item.label.slice(0, 17) + "…" : item.label));
    if (item.max !== undefined) {
      svg.append(el("rect", { class: "track", x: labelW, y, width: (barW * item.max) / top, height: 18, rx: 3 }));
    }
    const w = Math.max(item.value > 0 ? 2 : 0, (barW * item.value) / top);
    svg.append(el("rect", { class: item.alt ? "fill alt" : "fill", x: labelW, y, width: w, height: 18, rx: 3 }));
    svg.append(el("text", { x: labelW + barW + 8, y: y + 14 }, item.text ?? String(item.value)));
  });
  panel.append(svg);
  return panel;
}

/** Counts of `keys`, largest first. */
export function counts(keys: string[]): Bar[] {
  const m = new Map<string, number>();
  for (const k of keys) m.set(k, (m.get(k) ?? 0) + 1);
  return [...m.entries()].sort((a, b) => b[1] - a[1]).map(([label, value]) => ({ label, value }));
}
