/**
 * ArqClient: arq.v1 (docs/protocol.md) with the reconnection semantics of
 * libarq (client/arq.h), for browsers and Node.
 *
 * Two levels of state. A connection (Conn) is one WebSocket: open -> hello
 * sent -> welcomed -> gone. The client (State) goes idle -> connecting ->
 * connected and, when a connection is lost, disconnected -> reconnecting ->
 * recovering -> connected ... until failed or closed (both final).
 *
 * What outlives a connection: the subscriptions (SubState: where the
 * application is in the stream, its acks, the stream's epoch) and the
 * publishes without a puback (Pub, which keeps its encoded frame and re-sends
 * it byte for byte, same request id and msgid: ids only grow, so the id is
 * still unique on the new connection).
 *
 * Per subscription three offsets decide what is delivered and acked: pos
 * (the next offset the application may see; anything below is a redelivery
 * and dropped), wireRecv (the last offset the server delivered or skipped on
 * this connection) and wireAcked (what the server holds as acked on this
 * connection). An ack goes out only up to wireRecv, since the server refuses
 * acks beyond what it delivered: after a session resume the server
 * redelivers from its acked offset and our acks catch up as the (dropped)
 * redeliveries arrive.
 */
import { backoffDelay } from "./backoff.js";
import { decode, encode, validStream, type ClientMessage, type RestoredSub, type ServerMessage } from "./codec.js";
import { Emitter, reportLater } from "./emitter.js";
import { ArqError } from "./errors.js";
import { memorySession, type SavedSession, type SessionStore } from "./session-store.js";
import { SubState, Subscription, type Message, type SubscribeOptions } from "./subscription.js";
import { OPEN, resolveWebSocket, type WebSocketConstructor, type WebSocketLike } from "./transport.js";

export const VERSION = "0.1.0";

export type State =
  | "idle" // created; connect() not called yet
  | "connecting" // first connection attempt
  | "connected" // welcomed; everything from before a reconnect is recovered
  | "disconnected" // connection lost or attempt failed; next attempt after a backoff
  | "reconnecting" // a reconnection attempt is under way
  | "recovering" // welcomed again; waiting for the re-subscriptions' answers
  | "failed" // gave up (retries exhausted, permanent refusal, lost without reconnect). Final
  | "closed"; // closed by close(), an AbortSignal or the server (1000). Final

/**
 * A token, or a function the client calls before every connection attempt
 * (so a reconnect presents a fresh token). A token the server refuses (401)
 * ends the client unless the function then returns a different one.
 * Tokens are only sent in hello. The server enforces a token's exp during
 * the connection (close 4002 after it, docs/protocol.md 8a): this client
 * then reconnects and resumes with the provider's next token; it does not
 * send `refresh` on the live connection yet (libarq does).
 */
export type TokenProvider = () => string | undefined | Promise<string | undefined>;

export interface ClientOptions {
  /**
   * ws://host:port/ws or wss://..., or several: the client stays on one
   * while it works and, after a failed attempt or a lost connection, tries
   * the next one (in order, round robin), resuming its session there.
   */
  url: string | string[];
  token?: string | TokenProvider;
  /** hello.client, for the server's logs (default "arq-js/VERSION"). */
  clientName?: string;
  /** Reconnect after a lost connection or a failed attempt (default true). */
  reconnect?: boolean;
  /** Backoff before attempt n: uniform in [0, min(cap, base * 2^n)] (defaults 100 ms, 10 s). */
  backoffBaseMs?: number;
  backoffCapMs?: number;
  /** Failed attempts in a row before giving up; also bounds 503 retries (0 = unlimited, the default). */
  maxRetries?: number;
  /** Open + upgrade + welcome, per attempt (default 10 s). */
  connectTimeoutMs?: number;
  /** Publishes waiting for a puback (sent or queued) before publish() fails with "full" (default 10000). */
  maxPending?: number;
  /** How long an ack may wait to be sent together with later ones (default 20 ms). */
  ackDelayMs?: number;
  /** Where the session and resume token are kept (default: memory). */
  session?: SessionStore;
  /** Aborting it closes the client, as close() does. */
  signal?: AbortSignal;
  /** The WebSocket class (default: the global one, else the `ws` package). */
  WebSocket?: WebSocketConstructor;
  /** For tests: the random source of the backoff jitter and msgids. */
  random?: () => number;
}

export interface PublishOptions {
  /** Idempotency key, unique per producer across all streams (default: generated). */
  msgid?: string;
  headers?: Record<string, string>;
  /**
   * Acknowledgement level (docs/ha.md): "local" resolves once this arqd's
   * journal is fdatasynced, "replicated" once MySQL committed it too (it
   * survives the loss of the arqd machine). Default: the server's wal.ack.
   * A replicated publish the server cannot replicate now is answered 503
   * and retried like any 503, with the same msgid.
   */
  ack?: "local" | "replicated";
}

export interface PubAck {
  stream: string;
  offset: number;
  /** True when the server already had this msgid: offset is the original one, nothing was appended. */
  dup: boolean;
  msgid: string;
}

export interface ClientEvents {
  state: { from: State; to: State; error: ArqError | undefined };
  /** Offsets from..to of stream no longer exist and will not be delivered. */
  gap: { stream: string; from: number; to: number };
  /** The stream's history was reset: offsets seen so far are meaningless. newEpoch 0n: the stream is gone. */
  epoch: { stream: string; oldEpoch: bigint; newEpoch: bigint };
  /** A server error not tied to a request (e.g. an ack refused), or a failing session store. */
  error: ArqError;
}

export interface ClientStats {
  connects: number;
  reconnects: number;
  resumed: number;
  redeliveriesDropped: number;
  publishesResent: number;
  resubscribes: number;
  pendingPublishes: number;
}

interface Pub {
  id: number;
  stream: string;
  msgid: string;
  frame: Uint8Array;
  size: number;
  onWire: boolean;
  sent: boolean;
  waiting: boolean; // on hold after a 503, until the retry timer
  retries: number;
  resolve: (a: PubAck) => void;
  reject: (e: ArqError) => void;
}

interface Conn {
  ws: WebSocketLike;
  welcomed: boolean;
  dead: boolean;
  /** The token sent in this connection's hello. */
  token: string | undefined;
  /** An `error` answering hello (the server closes with 1008 right after). */
  helloError: { code: number; reason: string } | undefined;
}

const FINAL: ReadonlySet<State> = new Set(["failed", "closed"]);

export class ArqClient extends Emitter<ClientEvents> {
  private readonly opts: Required<Omit<ClientOptions, "token" | "signal" | "WebSocket" | "session">> & ClientOptions;
  private readonly store: SessionStore;
  private st: State = "idle";
  private conn: Conn | null = null;
  private saved: SavedSession | null = null;
  private storeLoaded = false;
  private nextId = 1;
  private msgidPrefix: string;
  private msgidSeq = 0;
  private maxPayloadV = 0;
  private maxInflight = 1024;
  private everWelcomed = false;
  private userClosed = false;
  private attempts = 0; // failed attempts in a row (since the last welcome)
  private readonly urls: string[];
  private urlIndex = 0; // the URL of the next attempt (options.url)
  private backoffN = 0;
  private welcomedAt = 0;
  private recoverPending = 0;
  private refusedToken: string | undefined | null = null;
  private readonly subs = new Map<string, SubState>();
  private readonly pubs = new Map<number, Pub>(); // in publish order
  private readonly unsubs = new Map<number, () => void>();
  private reconnectTimer: ReturnType<typeof setTimeout> | undefined;
  private connectTimer: ReturnType<typeof setTimeout> | undefined;
  private retryTimer: ReturnType<typeof setTimeout> | undefined;
  private ackTimer: ReturnType<typeof setTimeout> | undefined;
  private closeTimer: ReturnType<typeof setTimeout> | undefined;
  private connectWaiter: { resolve: () => void; reject: (e: ArqError) => void } | null = null;
  private closeWaiters: Array<() => void> = [];
  private readonly stats_: Omit<ClientStats, "pendingPublishes"> = {
    connects: 0,
    reconnects: 0,
    resumed: 0,
    redeliveriesDropped: 0,
    publishesResent: 0,
    resubscribes: 0,
  };

  constructor(options: ClientOptions) {
    super();
    this.urls = typeof options.url === "string" ? [options.url] : [...options.url];
    if (this.urls.length === 0) throw new ArqError("invalid", "no URL");
    for (const u of this.urls) {
      if (typeof u !== "string" || !/^wss?:\/\//.test(u)) throw new ArqError("invalid", `not a ws:// or wss:// URL: ${u}`);
    }
    this.opts = {
      clientName: `arq-js/${VERSION}`,
      reconnect: true,
      backoffBaseMs: 100,
      backoffCapMs: 10_000,
      maxRetries: 0,
      connectTimeoutMs: 10_000,
      maxPending: 10_000,
      ackDelayMs: 20,
      random: Math.random,
      ...options,
    };
    this.store = options.session ?? memorySession();
    this.msgidPrefix = randomHex(16, this.opts.random);
    const signal = options.signal;
    if (signal) {
      if (signal.aborted) this.userClosed = true;
      else signal.addEventListener("abort", () => void this.close(), { once: true });
    }
  }

  get state(): State {
    return this.st;
  }

  /** The session id of the last welcome (undefined before it). */
  get session(): string | undefined {
    return this.saved?.session;
  }

  /** welcome.max_payload (0 before the first welcome). */
  get maxPayload(): number {
    return this.maxPayloadV;
  }

  get stats(): ClientStats {
    return { ...this.stats_, pendingPublishes: this.pubs.size };
  }

  /**
   * Connect. Resolves after the first welcome; with reconnection, rejects
   * only once the client gave up (failed) or was closed. A client connects
   * once: after a final state, create a new one.
   */
  connect(): Promise<void> {
    if (this.st !== "idle") return Promise.reject(new ArqError("busy", "connect() was already called"));
    if (this.userClosed) return Promise.reject(new ArqError("closed", "aborted before connecting"));
    const p = new Promise<void>((resolve, reject) => {
      this.connectWaiter = { resolve, reject };
    });
    this.setState("connecting", undefined);
    void this.attempt();
    return p;
  }

  /**
   * Publish. Resolves once the message is durable, exactly once, even when it
   * had to be re-sent after a reconnect (then possibly with dup: true: the
   * server had stored it before the connection broke). Pipelined: does not
   * wait for earlier publishes. While reconnecting it is queued.
   */
  publish(stream: string, payload: Uint8Array | string, opts: PublishOptions = {}): Promise<PubAck> {
    if (!validStream(stream)) return Promise.reject(new ArqError("invalid", `invalid stream name '${stream}'`));
    const bytes = typeof payload === "string" ? new TextEncoder().encode(payload) : payload;
    if (!(bytes instanceof Uint8Array)) return Promise.reject(new ArqError("invalid", "payload is not a Uint8Array or string"));
    const live = this.canSend();
    if (!live && !this.mayQueue()) return Promise.reject(this.notConnected());
    if (this.everWelcomed && bytes.length > this.maxPayloadV) {
      return Promise.reject(new ArqError("too-big", `payload of ${bytes.length} bytes over max_payload ${this.maxPayloadV}`));
    }
    if (this.pubs.size >= this.opts.maxPending) {
      return Promise.reject(new ArqError("full", `${this.pubs.size} publishes already wait for a puback`));
    }
    const msgid = opts.msgid ?? `${this.msgidPrefix}-${++this.msgidSeq}`;
    const id = this.nextId++;
    const m: ClientMessage = { t: "pub", id, stream, payload: bytes, msgid };
    if (opts.headers && Object.keys(opts.headers).length > 0) m.headers = opts.headers;
    if (opts.ack !== undefined) {
      if (opts.ack !== "local" && opts.ack !== "replicated") {
        return Promise.reject(new ArqError("invalid", `ack must be "local" or "replicated"`));
      }
      m.ack = opts.ack;
    }
    return new Promise<PubAck>((resolve, reject) => {
      const p: Pub = {
        id,
        stream,
        msgid,
        frame: encode(m),
        size: bytes.length,
        onWire: false,
        sent: false,
        waiting: false,
        retries: 0,
        resolve,
        reject,
      };
      this.pubs.set(id, p);
      if (live) this.pubSend(p);
    });
  }

  /**
   * Subscribe to a stream (at most one subscription per stream). Every
   * message is handed to the application once, in offset order, across
   * reconnects and session resumes; gaps and epoch changes come as events.
   * Queued while reconnecting.
   *
   * With a session resumed from a persistent store (page reload), subscribe
   * before the welcome arrives (in the same turn as connect()) so that a
   * subscription the server restores continues after its acked offset;
   * `from` applies when it is not restored.
   */
  subscribe(stream: string, opts: SubscribeOptions = {}): Subscription {
    if (!validStream(stream)) throw new ArqError("invalid", `invalid stream name '${stream}'`);
    const f = opts.from ?? "latest";
    if (f !== "earliest" && f !== "latest" && !(Number.isSafeInteger(f) && f >= 1)) {
      throw new ArqError("invalid", `from must be "earliest", "latest" or an offset >= 1`);
    }
    if (opts.epoch !== undefined && typeof opts.epoch !== "bigint") throw new ArqError("invalid", "epoch must be a bigint");
    const live = this.canSend();
    if (!live && !this.mayQueue()) throw this.notConnected();
    if (this.subs.has(stream)) throw new ArqError("busy", `already subscribed to '${stream}'`);
    const s = new SubState(stream, opts);
    this.subs.set(stream, s);
    if (live) this.sendSub(s);
    return new Subscription(s, {
      ack: (st, off) => this.ack(st, off),
      unsubscribe: (st) => this.unsubscribe(st),
    });
  }

  /**
   * Close cleanly and stop reconnecting: pending acks are sent, then a close
   * frame (1000). Publishes still waiting reject with "closed"; iterators
   * end. Resolves once closed. Calling it again, or on a final client, is a
   * no-op.
   */
  close(): Promise<void> {
    if (FINAL.has(this.st)) return Promise.resolve();
    const done = new Promise<void>((res) => this.closeWaiters.push(res));
    if (this.userClosed && this.st !== "idle") return done;
    this.userClosed = true;
    clearTimeout(this.reconnectTimer);
    clearTimeout(this.retryTimer);
    if (this.st === "idle") {
      this.finish("closed", new ArqError("closed", "closed"));
      return done;
    }
    const c = this.conn;
    if (c && c.welcomed && c.ws.readyState === OPEN) {
      this.flushAllAcks();
      try {
        c.ws.close(1000);
      } catch {
        // already closing: its onclose finishes
      }
      // A server that never answers the close must not hold us forever.
      this.closeTimer = setTimeout(() => this.drop(c, new ArqError("closed", "closed")), this.opts.connectTimeoutMs);
    } else {
      if (c) this.drop(c, new ArqError("closed", "closed"));
      else this.finish("closed", new ArqError("closed", "closed"));
    }
    return done;
  }

  // ---- connection attempts ----

  private async attempt(): Promise<void> {
    if (this.st === "disconnected") this.setState("reconnecting", undefined);
    let token: string | undefined;
    let WS: WebSocketConstructor;
    try {
      if (!this.storeLoaded) {
        this.saved = await this.store.load();
        this.storeLoaded = true;
      }
      token = typeof this.opts.token === "function" ? await this.opts.token() : this.opts.token;
      WS = await resolveWebSocket(this.opts.WebSocket);
    } catch (e) {
      if (this.userClosed) return;
      this.lost(new ArqError("connection-lost", `connection attempt failed: ${(e as Error).message}`), false);
      return;
    }
    if (this.userClosed) return; // close() finished the client meanwhile
    if (this.refusedToken !== null && token === this.refusedToken) {
      this.finish("failed", new ArqError("server", "token refused and the token provider gave no other", 401));
      return;
    }
    let ws: WebSocketLike;
    try {
      ws = new WS(this.url, "arq.v1");
    } catch (e) {
      this.finish("failed", new ArqError("invalid", `cannot open ${this.url}: ${(e as Error).message}`));
      return;
    }
    ws.binaryType = "arraybuffer";
    const c: Conn = { ws, welcomed: false, dead: false, token, helloError: undefined };
    this.conn = c;
    this.connectTimer = setTimeout(
      () => this.drop(c, new ArqError("timeout", `no welcome within ${this.opts.connectTimeoutMs} ms`)),
      this.opts.connectTimeoutMs,
    );
    ws.onopen = () => {
      if (c.dead) return;
      const hello: ClientMessage = { t: "hello", client: this.opts.clientName };
      if (token) hello.token = token;
      if (this.saved) {
        hello.session = this.saved.session;
        hello.resume_token = this.saved.resumeToken;
      }
      this.sendOn(c, encode(hello));
    };
    ws.onmessage = (ev) => this.onData(c, ev.data);
    ws.onclose = (ev) => this.onClose(c, ev.code, ev.reason);
    ws.onerror = () => {}; // onclose follows with the code
  }

  private onClose(c: Conn, code: number, reason: string): void {
    if (c.dead) return;
    let err: ArqError;
    let permanent = false;
    if (this.userClosed) {
      err = new ArqError("closed", "closed");
    } else if (code === 4001) {
      err = new ArqError("session-taken", "the session was resumed by another connection (4001)");
      permanent = true;
    } else if (c.helloError) {
      const h = c.helloError;
      err = new ArqError("server", `hello refused: ${h.reason} (${h.code})`, h.code);
      if (h.code === 401 && typeof this.opts.token === "function") {
        // Perhaps expired: the provider gets a chance to give a fresh one.
        this.refusedToken = c.token;
      } else {
        permanent = h.code === 400 || h.code === 401 || h.code === 403;
      }
    } else if (code === 1008) {
      err = new ArqError("server", `refused by the server (1008 ${reason})`, 1008);
      permanent = true;
    } else if (code === 1000) {
      this.teardown(c);
      this.finish("closed", new ArqError("closed", `closed by the server (1000 ${reason})`));
      return;
    } else {
      err = new ArqError("connection-lost", `connection lost (${code}${reason ? " " + reason : ""})`);
    }
    this.teardown(c);
    if (this.userClosed) this.finish("closed", err);
    else this.lost(err, permanent);
  }

  /** Abandon connection c at once (timeout, protocol error, close() not answered). */
  private drop(c: Conn, err: ArqError): void {
    if (c.dead) return;
    this.teardown(c);
    try {
      if (c.ws.terminate) c.ws.terminate();
      else c.ws.close();
    } catch {
      // nothing more to do with this socket
    }
    if (this.userClosed) this.finish("closed", err);
    else this.lost(err, false);
  }

  /** Forget connection c: what was on its wire must be sent again on the next one. */
  private teardown(c: Conn): void {
    c.dead = true;
    c.ws.onopen = c.ws.onmessage = c.ws.onclose = null;
    if (this.conn === c) this.conn = null;
    clearTimeout(this.connectTimer);
    clearTimeout(this.ackTimer);
    this.ackTimer = undefined;
    clearTimeout(this.closeTimer);
    if (c.welcomed && Date.now() - this.welcomedAt >= this.opts.backoffCapMs) this.backoffN = 0;
    for (const s of this.subs.values()) {
      s.wire = "off";
      s.reqId = 0;
      s.recovering = false;
    }
    this.recoverPending = 0;
    for (const p of this.pubs.values()) p.onWire = false;
    for (const done of this.unsubs.values()) done();
    this.unsubs.clear();
  }

  /** The connection is gone or the attempt failed: reconnect later, or give up. */
  /** The URL the client is connected to, or will try next. */
  get url(): string {
    return this.urls[this.urlIndex];
  }

  private lost(err: ArqError, permanent: boolean): void {
    if (permanent || !this.opts.reconnect) {
      this.finish("failed", err);
      return;
    }
    this.attempts++;
    this.urlIndex = (this.urlIndex + 1) % this.urls.length; // fail over to the next URL
    if (this.opts.maxRetries > 0 && this.attempts > this.opts.maxRetries) {
      this.finish("failed", new ArqError(err.code, `${err.message}; gave up after ${this.opts.maxRetries} attempts`, err.status));
      return;
    }
    this.setState("disconnected", err);
    const delay = backoffDelay(this.backoffN++, this.opts.backoffBaseMs, this.opts.backoffCapMs, this.opts.random);
    this.reconnectTimer = setTimeout(() => void this.attempt(), delay);
  }

  /** Enter a final state: everything still pending fails with err (iterators just end after a close). */
  private finish(to: "failed" | "closed", err: ArqError): void {
    if (FINAL.has(this.st)) return;
    clearTimeout(this.reconnectTimer);
    clearTimeout(this.retryTimer);
    clearTimeout(this.connectTimer);
    clearTimeout(this.closeTimer);
    clearTimeout(this.ackTimer);
    if (this.conn) this.teardown(this.conn);
    this.setState(to, err);
    const pubErr = to === "closed" ? new ArqError("closed", "client closed before the puback") : err;
    const pubs = [...this.pubs.values()];
    this.pubs.clear();
    for (const p of pubs) p.reject(pubErr);
    const subs = [...this.subs.values()];
    this.subs.clear();
    for (const s of subs) s.end(to === "closed" ? null : err);
    const w = this.connectWaiter;
    this.connectWaiter = null;
    w?.reject(err);
    const cw = this.closeWaiters;
    this.closeWaiters = [];
    for (const f of cw) f();
  }

  private setState(to: State, error: ArqError | undefined): void {
    const from = this.st;
    if (from === to) return;
    this.st = to;
    this.emit("state", { from, to, error });
  }

  // ---- sending ----

  private canSend(): boolean {
    const c = this.conn;
    return c !== null && c.welcomed && !c.dead && !this.userClosed && c.ws.readyState === OPEN;
  }

  private mayQueue(): boolean {
    return this.opts.reconnect && !this.userClosed && this.st !== "idle" && !FINAL.has(this.st);
  }

  private notConnected(): ArqError {
    return FINAL.has(this.st)
      ? new ArqError(this.st === "closed" ? "closed" : "connection-lost", `client is ${this.st}`)
      : new ArqError("not-connected", `client is ${this.st}`);
  }

  private sendOn(c: Conn, frame: Uint8Array): boolean {
    try {
      c.ws.send(frame);
      return true;
    } catch (e) {
      this.drop(c, new ArqError("connection-lost", `send failed: ${(e as Error).message}`));
      return false;
    }
  }

  private send(m: ClientMessage): boolean {
    return this.conn !== null && this.sendOn(this.conn, encode(m));
  }

  private pubSend(p: Pub): boolean {
    if (!this.conn || !this.sendOn(this.conn, p.frame)) return false;
    if (p.sent) this.stats_.publishesResent++;
    p.sent = true;
    p.onWire = true;
    p.waiting = false;
    return true;
  }

  /** Send s's sub: from its position if it has one, else as the application asked. */
  private sendSub(s: SubState): boolean {
    const id = this.nextId++;
    const epoch = s.pos ? (s.epoch !== 0n ? s.epoch : undefined) : s.wantEpoch;
    const m: ClientMessage = { t: "sub", id, stream: s.stream, from: s.pos ? s.pos : s.from };
    // Epoch 0 is what the server reports for a stream that did not exist yet:
    // it names no history, so it is never sent.
    if (epoch !== undefined && epoch !== 0n) m.epoch = epoch;
    if (!this.send(m)) return false;
    if (s.confirmed || s.retries > 0) this.stats_.resubscribes++;
    s.reqId = id;
    s.wire = "pending";
    s.sentEpoch = m.epoch !== undefined;
    return true;
  }

  /**
   * Send the application's ack as far as the server can take it (up to
   * wireRecv). While it cannot take all of it (redeliveries after a resume),
   * ack in steps of a quarter window so the server does not pause.
   */
  private flushAck(s: SubState): void {
    if (s.wire !== "active" || !this.canSend()) return;
    const want = Math.max(s.acked, s.floor);
    const target = Math.min(want, s.wireRecv);
    if (target <= s.wireAcked) return;
    const step = Math.max(1, Math.floor(this.maxInflight / 4));
    if (target !== want && target - s.wireAcked < step) return;
    if (this.send({ t: "ack", stream: s.stream, offset: target })) s.wireAcked = target;
  }

  private flushAllAcks(): void {
    clearTimeout(this.ackTimer);
    this.ackTimer = undefined;
    for (const s of this.subs.values()) this.flushAck(s);
  }

  /** An ack recorded: sent now when a quarter window is waiting, else within ackDelayMs. */
  private ack(s: SubState, offset: number): void {
    if (this.subs.get(s.stream) !== s) throw new ArqError("invalid", `not subscribed to '${s.stream}'`);
    if (!Number.isSafeInteger(offset) || offset < 1 || offset >= s.pos) {
      throw new ArqError("invalid", `ack ${offset} of '${s.stream}' beyond the last offset handed out (${s.pos - 1})`);
    }
    if (offset <= s.acked) return;
    s.acked = offset;
    const step = Math.max(1, Math.floor(this.maxInflight / 4));
    if (s.acked - s.wireAcked >= step) this.flushAck(s);
    else this.ackTimer ??= setTimeout(() => this.flushAllAcks(), this.opts.ackDelayMs);
  }

  private unsubscribe(s: SubState): Promise<void> {
    if (this.subs.get(s.stream) !== s) return Promise.resolve();
    this.subs.delete(s.stream);
    if (s.recovering) this.recoverDone(s);
    s.end(null);
    if (s.wire === "off" || !this.canSend()) return Promise.resolve();
    const id = this.nextId++;
    return new Promise((resolve) => {
      this.unsubs.set(id, resolve);
      if (!this.send({ t: "unsub", id, stream: s.stream })) resolve();
    });
  }

  // ---- receiving ----

  private onData(c: Conn, data: unknown): void {
    if (c.dead) return;
    let m: ServerMessage | null;
    try {
      if (!(data instanceof ArrayBuffer || ArrayBuffer.isView(data))) {
        throw new ArqError("protocol", "protocol error: a text message");
      }
      const bytes =
        data instanceof ArrayBuffer ? new Uint8Array(data) : new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
      m = decode(bytes);
    } catch (e) {
      this.drop(c, e instanceof ArqError ? e : new ArqError("protocol", String(e)));
      return;
    }
    if (!m) return; // a type this client does not know: ignored (forward compatibility)
    if (!c.welcomed) {
      if (m.t === "welcome") this.onWelcome(c, m);
      else if (m.t === "error") c.helloError = { code: m.code, reason: m.reason };
      return; // anything else before welcome: ignored
    }
    switch (m.t) {
      case "msg":
        this.onMsg(m);
        break;
      case "puback": {
        const p = this.pubs.get(m.id);
        if (!p || !p.onWire) return;
        this.pubs.delete(m.id);
        p.resolve({ stream: p.stream, offset: m.offset, dup: m.dup, msgid: p.msgid });
        break;
      }
      case "subok": {
        const s = this.subByReq(m.id);
        if (s) this.onSubok(s, m.epoch, m.first, m.next);
        break;
      }
      case "nack":
        this.onRefusal(m.id, m.code, m.reason);
        break;
      case "error":
        if (m.id !== undefined && this.onRefusal(m.id, m.code, m.reason)) break;
        this.emit("error", new ArqError("server", m.reason, m.code));
        break;
      case "gap":
        this.onGap(m.stream, m.from, m.to);
        break;
      case "unsubok": {
        const done = this.unsubs.get(m.id);
        this.unsubs.delete(m.id);
        done?.();
        break;
      }
      case "welcome":
        this.drop(c, new ArqError("protocol", "protocol error: a second welcome"));
        break;
    }
  }

  private onWelcome(c: Conn, w: Extract<ServerMessage, { t: "welcome" }>): void {
    c.welcomed = true;
    clearTimeout(this.connectTimer);
    this.saved = { session: w.session, resumeToken: w.resumeToken };
    this.refusedToken = null;
    Promise.resolve()
      .then(() => this.store.save({ session: w.session, resumeToken: w.resumeToken }))
      .catch((e: unknown) => this.emit("error", new ArqError("invalid", `session store: ${(e as Error).message}`)));
    this.maxPayloadV = w.maxPayload;
    this.maxInflight = w.maxInflight;
    this.attempts = 0;
    this.welcomedAt = Date.now();
    const first = !this.everWelcomed;
    this.everWelcomed = true;
    this.stats_.connects++;
    if (!first) this.stats_.reconnects++;
    if (w.resumed) this.stats_.resumed++;
    if (w.resumed) this.restoreSubs(w.subs);
    if (c.dead) return;
    this.resendAll();
    if (c.dead) return;
    if (first) {
      this.setState("connected", undefined);
      const cw = this.connectWaiter;
      this.connectWaiter = null;
      cw?.resolve();
      return;
    }
    this.setState("recovering", undefined);
    if (this.recoverPending === 0 && this.st === "recovering") this.setState("connected", undefined);
  }

  /** welcome.subs of a resumed session. */
  private restoreSubs(restored: RestoredSub[]): void {
    for (const r of restored) {
      const s = this.subs.get(r.stream);
      const newEpoch = s !== undefined && s.epoch !== 0n && r.epoch !== 0n && s.epoch !== r.epoch;
      if (!s || (!newEpoch && s.pos && s.pos <= r.acked)) {
        // Not ours (any more), or the server would skip offsets the
        // application has not seen: drop it; resendAll subscribes ours again
        // and this one's messages are ignored until that subok.
        this.send({ t: "unsub", id: this.nextId++, stream: r.stream });
        continue;
      }
      s.wire = "active";
      s.reqId = 0;
      s.wireRecv = s.wireAcked = r.acked;
      if (newEpoch) {
        const old = s.epoch;
        s.epoch = r.epoch;
        s.pos = r.acked + 1;
        s.acked = r.acked;
        s.floor = 0;
        this.emit("epoch", { stream: s.stream, oldEpoch: old, newEpoch: r.epoch });
      } else {
        if (r.epoch !== 0n) s.epoch = r.epoch;
        if (!s.pos && typeof s.from === "number" && s.from > r.acked + 1) {
          s.pos = s.from; // the application's own position is further: drop what comes before
          s.floor = s.from - 1;
        }
        if (!s.pos) s.pos = r.acked + 1;
      }
      if (!s.confirmed) {
        s.confirmed = true;
        s.resolveInfo({ epoch: s.epoch, first: r.acked + 1, next: r.next });
      }
      this.flushAck(s);
    }
  }

  /**
   * After a welcome: subscribe again what the server did not restore, then
   * re-send the publishes without a puback, in their order.
   */
  private resendAll(): void {
    for (const s of this.subs.values()) {
      if (s.wire !== "off") continue;
      if (!this.sendSub(s)) return;
      s.recovering = true;
      this.recoverPending++;
    }
    for (const p of [...this.pubs.values()]) {
      if (p.onWire) continue;
      if (p.size > this.maxPayloadV) {
        // queued before we knew the limit
        this.pubs.delete(p.id);
        p.reject(new ArqError("too-big", `payload of ${p.size} bytes over max_payload ${this.maxPayloadV}`));
        continue;
      }
      p.waiting = false;
      if (!this.pubSend(p)) return;
    }
  }

  private subByReq(id: number): SubState | undefined {
    for (const s of this.subs.values()) if (s.wire === "pending" && s.reqId === id) return s;
    return undefined;
  }

  private recoverDone(s: SubState): void {
    if (!s.recovering) return;
    s.recovering = false;
    this.recoverPending--;
    if (this.recoverPending === 0 && this.st === "recovering") this.setState("connected", undefined);
  }

  /** The stream's history was reset: start over from the new epoch's earliest offset. */
  private subRestart(s: SubState): void {
    if (s.oldEpoch === 0n) s.oldEpoch = s.epoch;
    s.epoch = 0n;
    s.pos = 0;
    s.acked = 0;
    s.floor = 0;
    s.from = "earliest";
    s.wantEpoch = undefined;
  }

  private onSubok(s: SubState, epoch: bigint, first: number, next: number): void {
    if (s.pos && s.epoch !== 0n && epoch !== s.epoch) {
      // Another epoch than ours (the server refuses a sub carrying our epoch
      // with 409, so this is one sent without it): the history was reset.
      // Our offsets are meaningless there.
      this.subRestart(s);
    }
    // Where the server starts: a `from` beyond its tail waits for that offset.
    let start: number;
    if (s.pos) start = s.pos;
    else if (s.from === "earliest") start = first;
    else if (s.from === "latest") start = next;
    else start = s.from;
    if (start === 0) start = 1;
    s.wire = "active";
    s.reqId = 0;
    s.retries = 0;
    s.wireRecv = s.wireAcked = start - 1;
    if (epoch !== 0n) s.epoch = epoch;
    if (!s.pos) s.pos = start;
    if (s.oldEpoch !== 0n) {
      const old = s.oldEpoch;
      s.oldEpoch = 0n;
      this.emit("epoch", { stream: s.stream, oldEpoch: old, newEpoch: epoch });
    }
    if (!s.confirmed) {
      s.confirmed = true;
      s.resolveInfo({ epoch, first, next });
    }
    this.recoverDone(s);
  }

  /** A nack, or an error with an id. Returns false when the id is not a request of ours. */
  private onRefusal(id: number, code: number, reason: string): boolean {
    const err = new ArqError("server", reason || `refused (${code})`, code);
    const p = this.pubs.get(id);
    if (p && p.onWire) {
      p.onWire = false;
      if (code === 503 && (this.opts.maxRetries === 0 || p.retries < this.opts.maxRetries)) {
        p.waiting = true;
        this.scheduleRetry(p.retries++);
        return true;
      }
      this.pubs.delete(id);
      p.reject(err);
      return true;
    }
    const s = this.subByReq(id);
    if (!s) {
      const done = this.unsubs.get(id); // an unsub: the subscription is gone either way
      this.unsubs.delete(id);
      done?.();
      return done !== undefined;
    }
    s.wire = "off";
    s.reqId = 0;
    if (code === 503 && this.opts.reconnect && (this.opts.maxRetries === 0 || s.retries < this.opts.maxRetries)) {
      this.scheduleRetry(s.retries++);
      return true;
    }
    if (code === 409 && s.confirmed && s.sentEpoch) {
      // The stream's history was reset: start over in the new epoch, from
      // its earliest offset; the subok tells the application.
      this.subRestart(s);
      this.sendSub(s);
      return true;
    }
    this.subs.delete(s.stream);
    this.recoverDone(s);
    s.end(err);
    return true;
  }

  private scheduleRetry(n: number): void {
    if (this.retryTimer !== undefined) return;
    const delay = backoffDelay(n, this.opts.backoffBaseMs, this.opts.backoffCapMs, this.opts.random);
    this.retryTimer = setTimeout(() => {
      this.retryTimer = undefined;
      if (!this.canSend()) return; // the next welcome re-sends everything anyway
      for (const s of this.subs.values()) if (s.wire === "off" && !this.sendSub(s)) return;
      for (const p of [...this.pubs.values()]) if (p.waiting && !p.onWire && !this.pubSend(p)) return;
    }, delay);
  }

  private onMsg(m: Extract<ServerMessage, { t: "msg" }>): void {
    const s = this.subs.get(m.stream);
    if (!s || s.wire !== "active") return; // not (yet) subscribed on this connection
    if (m.offset > s.wireRecv) s.wireRecv = m.offset;
    if (m.offset < s.pos) {
      this.stats_.redeliveriesDropped++;
      this.flushAck(s);
      return;
    }
    s.pos = m.offset + 1;
    const payload = m.payload;
    const msg: Message = {
      stream: m.stream,
      offset: m.offset,
      ts: m.ts,
      payload,
      headers: m.headers,
      text: () => new TextDecoder().decode(payload),
    };
    if (s.onMessage) {
      try {
        s.onMessage(msg);
      } catch (e) {
        reportLater(e);
      }
      if (s.autoAck && this.subs.get(s.stream) === s) this.ack(s, m.offset);
    } else {
      s.push(msg);
    }
  }

  private onGap(stream: string, from: number, to: number): void {
    const s = this.subs.get(stream);
    if (!s || s.wire !== "active") return;
    // The server counts a gap as delivered and acked.
    s.wireRecv = Math.max(s.wireRecv, to);
    s.wireAcked = Math.max(s.wireAcked, to);
    if (to < s.pos) return; // reported before
    if (from < s.pos) from = s.pos;
    s.pos = to + 1;
    this.emit("gap", { stream, from, to });
  }
}

function randomHex(n: number, random: () => number): string {
  let out = "";
  const c = (globalThis as { crypto?: Crypto }).crypto;
  if (c?.getRandomValues && random === Math.random) {
    const b = c.getRandomValues(new Uint8Array(Math.ceil(n / 2)));
    for (const x of b) out += x.toString(16).padStart(2, "0");
    return out.slice(0, n);
  }
  for (let i = 0; i < n; i++) out += Math.floor(random() * 16).toString(16);
  return out;
}
