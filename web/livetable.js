// livetable.js: a small client for livetable's WebSocket protocol (docs/protocol.md).
// An ES module with no dependencies; works the same in a plain page, React or Angular.
//
//   import { LiveTable } from "/livetable.js";
//   const lt = new LiveTable("ws://host:8080/ws", { table: "game_odds", keys: ["g1"] });
//   lt.addEventListener("change", (e) => render(e.detail.rows, e.detail.changed));
//   lt.addEventListener("status", (e) => showStatus(e.detail));   // connecting | open | closed
//   lt.connect();
//
// Events (CustomEvent, data in .detail):
//   status   "connecting" | "open" | "closed"
//   snapshot {table, rows, epoch, seq, pos}
//   change   {table, rows, changed: Set of keys, patch, seq, pos, tsMs}   (after a snapshot or a patch)
//   waiting  {table}   the table does not exist yet; its snapshot follows when it appears
//   freshness {caughtUp, reason}   the server stopped (or started again) being caught up
//   error    {code, message, fatal}
//
// Publishing (docs/publish.md): `await lt.publish(topic, key, value, id)` resolves with the server's
// answer, `{type: "ack", id, partition, offset, duplicate?}` or `{type: "nack", id, code, message}`.
// A publish not yet answered when the connection drops is sent again, with the same id, once it is
// back: the server remembers ids, so the topic holds it once and the answer is the original ack.
// Reconnects with exponential backoff and resumes from the last position (`pos`) it saw, on the
// same server or any other of the deployment (protocol version 2).

const own = Object.prototype.hasOwnProperty;

/** RFC 7386 JSON Merge Patch: returns target with patch applied (target is modified in place).
 * Keys such as `__proto__` are ordinary data keys: they never reach an object's prototype. */
export function mergePatch(target, patch) {
  if (patch === null || typeof patch !== "object" || Array.isArray(patch)) return patch;
  if (target === null || typeof target !== "object" || Array.isArray(target)) target = {};
  for (const k of Object.keys(patch)) {
    const v = patch[k];
    if (v === null) {
      if (own.call(target, k)) delete target[k];
    } else {
      const merged = mergePatch(own.call(target, k) ? target[k] : undefined, v);
      Object.defineProperty(target, k, { value: merged, writable: true, enumerable: true, configurable: true });
    }
  }
  return target;
}

export class LiveTable extends EventTarget {
  /**
   * @param {string} url  ws://host:port/ws
   * @param {{table?: string, keys?: string[], minBackoffMs?: number, maxBackoffMs?: number}} opts
   */
  constructor(url, opts = {}) {
    super();
    this.url = url;
    this.table = opts.table ?? null;
    this.keys = opts.keys ?? null;
    this.rows = {};
    this.epoch = null;
    this.seq = null;
    this.pos = null;
    this.lastTsMs = null;
    this.minBackoff = opts.minBackoffMs ?? 250;
    this.maxBackoff = opts.maxBackoffMs ?? 10000;
    this.backoff = this.minBackoff;
    this.ws = null;
    this.closedByUser = false;
    this.awaitingSnapshot = false; // after subscribe(): patches of the former subscription are dropped
    this.pending = new Map(); // publish id -> {frame, resolve}
  }

  connect() {
    this.closedByUser = false;
    this.awaitingSnapshot = false;
    const q = new URLSearchParams();
    if (this.table) q.set("table", this.table);
    if (this.keys && this.keys.length) q.set("keys", this.keys.join(","));
    if (this.pos) q.set("since", this.pos);
    this._emit("status", "connecting");
    const ws = new WebSocket(`${this.url}?${q}`);
    this.ws = ws;
    ws.onopen = () => {
      this.backoff = this.minBackoff;
      this._emit("status", "open");
      for (const { frame } of this.pending.values()) ws.send(frame);
    };
    ws.onmessage = (ev) => this._onMessage(ev.data);
    ws.onclose = () => {
      if (this.ws !== ws) return;
      this._emit("status", "closed");
      if (!this.closedByUser) {
        setTimeout(() => this.connect(), this.backoff);
        this.backoff = Math.min(this.backoff * 2, this.maxBackoff);
      }
    };
  }

  /** Changes the subscription (table and key filter). On an open connection the former table is
   * unsubscribed and the new one subscribed; on one still connecting, the connection starts again
   * with the new one; otherwise the next connect() uses it. */
  subscribe(table, keys = null) {
    const former = this.table;
    this.table = table;
    this.keys = keys && keys.length ? keys : null;
    this.rows = {};
    this.epoch = this.seq = this.pos = null;
    const ws = this.ws;
    if (ws && ws.readyState === WebSocket.OPEN) {
      if (former && former !== table) ws.send(JSON.stringify({ type: "unsubscribe", table: former }));
      const msg = { type: "subscribe", table };
      if (this.keys) msg.keys = this.keys;
      ws.send(JSON.stringify(msg));
      // until its snapshot, patches of this table are the former subscription's (other keys)
      this.awaitingSnapshot = true;
    } else if (ws && ws.readyState === WebSocket.CONNECTING && !this.closedByUser) {
      // its URL names the former subscription: start again with this one
      this.ws = null;
      ws.close();
      this.connect();
    }
  }

  /** Publishes `value` under `key` to a writable `topic`; resolves with the ack or nack. */
  publish(topic, key, value, id) {
    const frame = JSON.stringify({ type: "publish", topic, key, value, id });
    return new Promise((resolve) => {
      const before = this.pending.get(id);
      if (before) before.resolve({ type: "nack", id, code: "superseded", message: "published again with the same id" });
      this.pending.set(id, { frame, resolve });
      if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(frame);
    });
  }

  close() {
    this.closedByUser = true;
    for (const [id, p] of this.pending) p.resolve({ type: "nack", id, code: "closed", message: "the client was closed before an answer" });
    this.pending.clear();
    if (this.ws) this.ws.close();
  }

  _onMessage(text) {
    let m;
    try {
      m = JSON.parse(text);
    } catch {
      return;
    }
    if (m.type === "snapshot") {
      if (this.table && m.table !== this.table) return;
      this.awaitingSnapshot = false;
      this.rows = mergePatch({}, m.rows);
      // a big snapshot continues in patch frames flagged `more`: resume only from a complete state
      this.epoch = m.epoch;
      this.seq = m.seq;
      this.pos = m.more ? null : m.pos || null;
      this._emit("snapshot", { table: m.table, rows: this.rows, epoch: m.epoch, seq: m.seq, pos: m.pos });
      this._emit("change", { table: m.table, rows: this.rows, changed: new Set(Object.keys(m.rows)), patch: null, seq: m.seq, pos: m.pos, tsMs: null });
    } else if (m.type === "patch") {
      if ((this.table && m.table !== this.table) || this.awaitingSnapshot) return;
      this.rows = mergePatch(this.rows, m.patch);
      this.epoch = m.epoch;
      this.seq = m.seq;
      this.pos = m.more ? null : m.pos || null;
      if (m.ts_ms !== null && m.ts_ms !== undefined) this.lastTsMs = m.ts_ms;
      this._emit("change", { table: m.table, rows: this.rows, changed: new Set(Object.keys(m.patch)), patch: m.patch, seq: m.seq, pos: m.pos, tsMs: m.ts_ms });
    } else if (m.type === "waiting") {
      this._emit("waiting", { table: m.table });
    } else if (m.type === "status") {
      this.caughtUp = !!m.caught_up;
      this._emit("freshness", { caughtUp: this.caughtUp, reason: m.reason });
    } else if (m.type === "ack" || m.type === "nack") {
      const p = this.pending.get(m.id);
      if (p) {
        this.pending.delete(m.id);
        p.resolve(m);
      }
    } else if (m.type === "error") {
      this._emit("error", { code: m.code, message: m.message, fatal: !!m.fatal });
    }
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}
