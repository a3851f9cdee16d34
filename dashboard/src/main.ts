// The single page: routes by path, follows the live state, draws the current page.

import { follow, setToken } from "./live";
import * as pages from "./pages";
import type { State } from "./types";

const routes: Record<string, [string, (main: HTMLElement) => pages.Update]> = {
  "/": ["Overview", pages.overview],
  "/k8s/vms": ["Virtual machines", pages.vms],
  "/k8s/charts": ["Charts", pages.charts],
  "/k8s/templates": ["Templates", pages.templates],
  "/k8s/snapshots": ["Snapshots", pages.snapshots],
  "/k8s/operations": ["Operations", pages.operations],
  "/k8s/events": ["Events", pages.events],
};

let state: State | null = null;
let update: pages.Update = () => {};

function show(path: string): void {
  const [title, page] = routes[path] ?? routes["/"];
  const main = document.getElementById("main")!;
  main.replaceChildren();
  update = page(main);
  document.title = `${title} · HyperSDK`;
  for (const a of document.querySelectorAll<HTMLAnchorElement>("nav a")) {
    if (a.pathname === path) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  if (state) update(state);
}

/** Follows links inside the page without reloading it (the live connection stays). */
document.addEventListener("click", (e) => {
  const a = (e.target as Element).closest("a");
  if (!a || a.origin !== location.origin || !(a.pathname in routes) || e.ctrlKey || e.metaKey) return;
  e.preventDefault();
  history.pushState(null, "", a.pathname + location.search);
  show(a.pathname);
  document.getElementById("main")!.focus();
});
window.addEventListener("popstate", () => show(location.pathname));

document.getElementById("theme")!.addEventListener("click", () => {
  const root = document.documentElement;
  const dark = root.dataset.theme ? root.dataset.theme === "dark" : matchMedia("(prefers-color-scheme: dark)").matches;
  root.dataset.theme = dark ? "light" : "dark";
  localStorage.setItem("theme", root.dataset.theme);
});

/** Asks for the bearer token (the dashboard is exposed). */
function login(): Promise<void> {
  const dialog = document.getElementById("login") as HTMLDialogElement;
  const input = document.getElementById("token") as HTMLInputElement;
  dialog.showModal();
  return new Promise((resolve) =>
    dialog.addEventListener(
      "close",
      () => {
        setToken(input.value.trim());
        resolve();
      },
      { once: true },
    ),
  );
}

const live = document.getElementById("live")!;
show(location.pathname);
void follow({
  state(s) {
    const first = state === null;
    state = s;
    update(s);
    // Time to first render, for measurements (performance.getEntriesByName).
    if (first) performance.mark("dashboard:first-render");
  },
  status(connected) {
    live.textContent = connected ? "Live" : "Reconnecting…";
    live.className = connected ? "live on" : "live off";
  },
  unauthorized: login,
});
