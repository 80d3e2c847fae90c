/**
 * One subscription: where the application is in the stream, and the queue
 * behind its async iterator. The client (client.ts) owns the protocol side;
 * this file only holds state and hands messages to the application.
 */
import type { From } from "./codec.js";
import { ArqError } from "./errors.js";

export interface Message {
  stream: string;
  offset: number;
  /** When the message became durable, unix microseconds. */
  ts: number;
  payload: Uint8Array;
  headers: Record<string, string> | undefined;
  /** The payload decoded as UTF-8. */
  text(): string;
}

/** What the server answered to the subscription (its first subok, or a resumed welcome). */
export interface SubscriptionInfo {
  epoch: bigint;
  /** The offset delivery starts at (a restored subscription: acked + 1). */
  first: number;
  next: number;
}

export interface SubscribeOptions {
  /** Where to start: "earliest", "latest" (default) or an offset >= 1. */
  from?: From;
  /** The epoch the offset in `from` belongs to (a 409 then means history was reset). */
  epoch?: bigint;
  /**
   * Called for every message, in offset order, each offset once. Without it,
   * read the messages with `for await (const m of subscription)`.
   */
  onMessage?: (m: Message) => void;
  /**
   * Ack each message once the application is done with it (default true):
   * when onMessage returns, or when the iterator is asked for the next one.
   * With false, call subscription.ack(offset) (cumulative).
   */
  autoAck?: boolean;
}

type Wire = "off" | "pending" | "active";

/** Internal state; the application sees the Subscription facade below. */
export class SubState {
  readonly stream: string;
  from: From;
  wantEpoch: bigint | undefined;
  readonly autoAck: boolean;
  readonly onMessage: ((m: Message) => void) | undefined;

  /** Next offset the application may see (0: not known yet); anything below is a redelivery. */
  pos = 0;
  /** Highest offset the application acked. */
  acked = 0;
  /** Offsets up to floor were skipped for the application (before its `from`): acked for it. */
  floor = 0;
  /** The stream's epoch as last told by the server (0n: unknown, or the stream did not exist). */
  epoch = 0n;
  /** The epoch lost to a history reset, until the application is told. */
  oldEpoch = 0n;

  wire: Wire = "off";
  reqId = 0;
  /** Whether the last sub sent carried an epoch (a 409 then means a reset). */
  sentEpoch = false;
  /** Last offset the server delivered (or skipped) on this connection. */
  wireRecv = 0;
  /** What the server holds as acked on this connection. */
  wireAcked = 0;
  confirmed = false;
  recovering = false;
  retries = 0;
  ended = false;

  readonly info: Promise<SubscriptionInfo>;
  resolveInfo!: (i: SubscriptionInfo) => void;
  rejectInfo!: (e: ArqError) => void;

  private queue: Message[] = [];
  private waiter: ((r: IteratorResult<Message>) => void) | null = null;
  private waiterFail: ((e: unknown) => void) | null = null;
  private endError: ArqError | null = null;
  /** Offset of the message the iterator handed out last, acked on the next pull. */
  private handedOut = 0;
  iterating = false;

  constructor(stream: string, opts: SubscribeOptions) {
    this.stream = stream;
    this.from = opts.from ?? "latest";
    this.wantEpoch = opts.epoch;
    this.autoAck = opts.autoAck ?? true;
    this.onMessage = opts.onMessage;
    this.info = new Promise((res, rej) => {
      this.resolveInfo = res;
      this.rejectInfo = rej;
    });
    // Refusals also reach the iterator and the client's events; an
    // application that never awaits `ready` must not crash the process.
    this.info.catch(() => {});
  }

  /** Queue m for the iterator (the callback path does not come here). */
  push(m: Message): void {
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = this.waiterFail = null;
      this.handedOut = m.offset;
      w({ value: m, done: false });
    } else {
      this.queue.push(m);
    }
  }

  /** No more messages: the iterator drains its queue, then ends (or throws err). */
  end(err: ArqError | null): void {
    if (this.ended) return;
    this.ended = true;
    this.endError = err;
    if (err && !this.confirmed) this.rejectInfo(err);
    if (this.waiter && this.queue.length === 0) {
      const w = this.waiter;
      const f = this.waiterFail;
      this.waiter = this.waiterFail = null;
      if (err) f?.(err);
      else w({ value: undefined, done: true });
    }
  }

  /**
   * The iterator's next(): acks what was handed out before (the application
   * asks for more, so it is done with it), then waits for a message.
   */
  next(ackDone: (offset: number) => void): Promise<IteratorResult<Message>> {
    if (this.handedOut && this.autoAck && !this.ended) ackDone(this.handedOut);
    this.handedOut = 0;
    const m = this.queue.shift();
    if (m) {
      this.handedOut = m.offset;
      return Promise.resolve({ value: m, done: false });
    }
    if (this.ended) return this.endError ? Promise.reject(this.endError) : Promise.resolve({ value: undefined, done: true });
    return new Promise((res, rej) => {
      this.waiter = res;
      this.waiterFail = rej;
    });
  }
}

/** The application's handle on a subscription. */
export class Subscription implements AsyncIterable<Message> {
  /** Resolves with the server's answer; rejects if the subscription is refused (e.g. 403). */
  readonly ready: Promise<SubscriptionInfo>;

  constructor(
    private readonly state: SubState,
    private readonly ops: {
      ack(s: SubState, offset: number): void;
      unsubscribe(s: SubState): Promise<void>;
    },
  ) {
    this.ready = state.info;
  }

  get stream(): string {
    return this.state.stream;
  }

  /** The stream's epoch as last told by the server (0n while unknown). */
  get epoch(): bigint {
    return this.state.epoch;
  }

  /** The next offset this subscription will hand to the application (0 before the server answered). */
  get position(): number {
    return this.state.pos;
  }

  /**
   * Cumulative ack: every message up to `offset` is processed. It must not
   * exceed the last offset handed to the application. Recorded at once, sent
   * as soon as the server can take it, and again after a reconnect.
   */
  ack(offset: number): void {
    this.ops.ack(this.state, offset);
  }

  /** Stop the subscription; messages already on their way are dropped. */
  unsubscribe(): Promise<void> {
    return this.ops.unsubscribe(this.state);
  }

  [Symbol.asyncIterator](): AsyncIterator<Message> {
    const s = this.state;
    if (s.onMessage) throw new ArqError("invalid", "subscription has an onMessage callback: it cannot be iterated too");
    if (s.iterating) throw new ArqError("busy", "subscription is already being iterated");
    s.iterating = true;
    return {
      next: () => s.next((off) => this.ops.ack(s, off)),
      // Leaving a for-await loop (break, return, throw) ends the
      // subscription, without waiting for the server's unsubok.
      return: () => {
        void this.unsubscribe();
        return Promise.resolve({ value: undefined, done: true });
      },
    };
  }
}
