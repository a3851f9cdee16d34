// The live connection: server-sent events read with fetch (EventSource cannot send the bearer
// token), reconnecting after the controller goes away.

import type { State } from "./types";

const TOKEN_KEY = "hypersdk-token";

export function token(): string | null {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function setToken(t: string): void {
  sessionStorage.setItem(TOKEN_KEY, t);
}

export function headers(): Record<string, string> {
  const t = token();
  return t ? { Authorization: `Bearer ${t}` } : {};
}

export interface Handlers {
  state(s: State): void;
  status(connected: boolean): void;
  unauthorized(): Promise<void>;
}

/** Splits a server-sent event stream's text into events; returns what is left over. */
export function parseEvents(buffer: string, emit: (event: string, data: string) => void): string {
  const blocks = buffer.split("\n\n");
  const rest = blocks.pop() ?? "";
  for (const block of blocks) {
    let event = "message";
    const data: string[] = [];
    for (const line of block.split("\n")) {
      if (line.startsWith("event:")) event = line.slice(6).trim();
      else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
    }
    if (data.length) emit(event, data.join("\n"));
  }
  return rest;
}

/** Follows /api/events for ever. */
export async function follow(h: Handlers): Promise<never> {
  let delay = 250;
  for (;;) {
    try {
      const resp = await fetch("/api/events", { headers: headers(), cache: "no-store" });
      if (resp.status === 401) {
        h.status(false);
        await h.unauthorized();
        continue;
      }
      if (!resp.ok || !resp.body) throw new Error(`HTTP ${resp.status}`);
      h.status(true);
      delay = 250;
      const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer = parseEvents(buffer + value, (event, data) => {
          if (event === "state") h.state(JSON.parse(data) as State);
        });
      }
    } catch {
      // The controller restarts or the network drops: try again below.
    }
    h.status(false);
    await new Promise((r) => setTimeout(r, delay));
    delay = Math.min(delay * 2, 2000);
  }
}
