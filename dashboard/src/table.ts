// Tables patched in place by row key: a live update changes only the cells whose text changed,
// so focus, selection and the buttons of a row survive updates.

/** A cell: text, or a node to render (redrawn only when its `key` changes). */
export type Cell = string | { key: string; node: () => Node; className?: string };

export interface Column {
  title: string;
  field: string;
  narrow?: boolean;
}

export interface Row {
  key: string;
  cells: Cell[];
}

export function table(columns: Column[], label: string): { root: HTMLElement; update(rows: Row[]): void } {
  const wrap = document.createElement("div");
  wrap.className = "table-wrap";
  const t = document.createElement("table");
  t.setAttribute("aria-label", label);
  const head = t.createTHead().insertRow();
  for (const c of columns) {
    const th = document.createElement("th");
    th.scope = "col";
    th.textContent = c.title;
    if (c.narrow) th.className = "hide-narrow";
    head.append(th);
  }
  const body = t.createTBody();
  wrap.append(t);
  const byKey = new Map<string, HTMLTableRowElement>();
  const update = (rows: Row[]) => {
    const seen = new Set<string>();
    rows.forEach((row, i) => {
      seen.add(row.key);
      let tr = byKey.get(row.key);
      if (!tr) {
        tr = document.createElement("tr");
        tr.dataset.key = row.key;
        for (const c of columns) {
          const td = document.createElement("td");
          td.dataset.field = c.field;
          if (c.narrow) td.className = "hide-narrow";
          tr.append(td);
        }
        byKey.set(row.key, tr);
      }
      row.cells.forEach((cell, n) => patch(tr!.cells[n], cell, columns[n]));
      if (body.rows[i] !== tr) body.insertBefore(tr, body.rows[i] ?? null);
    });
    for (const [key, tr] of byKey) {
      if (!seen.has(key)) {
        tr.remove();
        byKey.delete(key);
      }
    }
  };
  return { root: wrap, update };
}

function patch(td: HTMLTableCellElement, cell: Cell, column: Column): void {
  if (typeof cell === "string") {
    if (td.textContent !== cell || td.children.length) td.textContent = cell;
    delete td.dataset.k;
    return;
  }
  if (td.dataset.k === cell.key) return;
  td.dataset.k = cell.key;
  td.className = [cell.className, column.narrow ? "hide-narrow" : ""].filter(Boolean).join(" ");
  td.replaceChildren(cell.node());
}

/** A `<span>` with `text` and CSS classes. */
export function span(text: string, className: string): HTMLElement {
  const s = document.createElement("span");
  s.className = className;
  s.textContent = text;
  return s;
}
