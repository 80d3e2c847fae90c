// An in-process stand-in for the network: a WebSocket class whose
// connections a test plays the server side of (no sockets, no timers of its
// own), so the client's state machine is tested step by step.
import { decode, encode } from "@msgpack/msgpack";

export class FakeServer {
  constructor() {
    this.conns = [];
    this.waiters = [];
    const server = this;
    this.WebSocket = class {
      constructor(url, protocols) {
        this.url = url;
        this.protocols = protocols;
        this.readyState = 0;
        this.binaryType = "blob";
        this.inbox = [];
        this.inboxWaiters = [];
        this.onopen = this.onmessage = this.onclose = this.onerror = null;
        server.conns.push(this);
        server.waiters = server.waiters.filter((ready) => !ready());
      }
      send(data) {
        if (this.readyState !== 1) throw new Error("not open");
        const m = decode(data, { useBigInt64: true });
        m.raw = Uint8Array.from(data);
        const w = this.inboxWaiters.shift();
        if (w) w(m);
        else this.inbox.push(m);
      }
      close(code = 1005) {
        if (this.readyState >= 2) return;
        this.readyState = 3;
        queueMicrotask(() => this.onclose?.({ code: code === 1000 ? 1000 : 1005, reason: "" }));
      }
      // ---- the test's side ----
      open() {
        this.readyState = 1;
        this.onopen?.({});
      }
      recv() {
        const m = this.inbox.shift();
        return m ? Promise.resolve(m) : new Promise((r) => this.inboxWaiters.push(r));
      }
      async recvType(t) {
        for (;;) {
          const m = await this.recv();
          if (m.t === t) return m;
        }
      }
      push(obj) {
        const bytes = encode(obj, { useBigInt64: true });
        this.onmessage?.({ data: bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength) });
      }
      drop(code = 1006) {
        this.readyState = 3;
        this.onclose?.({ code, reason: "" });
      }
    };
  }

  /** Connection n (counting from 0), once the client opened it. */
  conn(n) {
    return new Promise((r) => {
      const ready = () => (this.conns.length > n ? (r(this.conns[n]), true) : false);
      if (!ready()) this.waiters.push(ready);
    });
  }

  /** Accept connection n: open it, read hello, answer welcome. Returns [conn, hello]. */
  async accept(n, welcome = {}) {
    const c = await this.conn(n);
    c.open();
    const hello = await c.recv();
    c.push({ t: "welcome", session: "s1", resume_token: "rt1", resumed: false, session_ttl: 60, server: "fake",
      max_payload: 1024, max_inflight: 8, ...welcome });
    return [c, hello];
  }
}

export const tick = () => new Promise((r) => setTimeout(r, 5));
