/**
 * arq.v1 messages (docs/protocol.md sections 5 and 6) to and from msgpack.
 *
 * Integers: epochs are uint64 and random, so they routinely exceed 2^53. They
 * are decoded with useBigInt64 (a uint64 on the wire becomes a bigint) and
 * always handled as bigint; they are encoded from a bigint, which the encoder
 * writes as a msgpack uint64 (0xcf) — never as a float, which the server
 * refuses. Offsets, counts and times are exposed as numbers: an offset stays
 * far below 2^53, and one that does not is a protocol error rather than a
 * silently rounded value.
 */
import { Decoder, Encoder } from "@msgpack/msgpack";

import { ArqError } from "./errors.js";

const encoder = new Encoder({ useBigInt64: true, ignoreUndefined: true });
const decoder = new Decoder({ useBigInt64: true });

export type From = "earliest" | "latest" | number;

export type ClientMessage =
  | { t: "hello"; client: string; token?: string; session?: string; resume_token?: string }
  | { t: "sub"; id: number; stream: string; from: From; epoch?: bigint }
  | { t: "unsub"; id: number; stream: string }
  | {
      t: "pub";
      id: number;
      stream: string;
      payload: Uint8Array;
      msgid: string;
      headers?: Record<string, string>;
      ack?: "local" | "replicated";
    }
  | { t: "ack"; stream: string; offset: number };

export function encode(m: ClientMessage): Uint8Array {
  return encoder.encode(m);
}

export interface RestoredSub {
  stream: string;
  epoch: bigint;
  acked: number;
  next: number;
}

export type ServerMessage =
  | {
      t: "welcome";
      session: string;
      resumeToken: string;
      resumed: boolean;
      subs: RestoredSub[];
      maxPayload: number;
      maxInflight: number;
    }
  | { t: "subok"; id: number; stream: string; epoch: bigint; first: number; next: number }
  | { t: "unsubok"; id: number }
  | { t: "puback"; id: number; offset: number; dup: boolean }
  | { t: "nack"; id: number; code: number; reason: string }
  | { t: "error"; id: number | undefined; code: number; reason: string }
  | {
      t: "msg";
      stream: string;
      offset: number;
      ts: number;
      payload: Uint8Array;
      headers: Record<string, string> | undefined;
    }
  | { t: "gap"; stream: string; from: number; to: number };

function bad(what: string): never {
  throw new ArqError("protocol", `protocol error: ${what}`);
}

type Fields = Record<string, unknown>;

function str(m: Fields, k: string): string {
  const v = m[k];
  return typeof v === "string" ? v : bad(`${String(m.t)}.${k} is not a string`);
}

function optStr(m: Fields, k: string, dflt: string): string {
  return m[k] === undefined || m[k] === null ? dflt : str(m, k);
}

function uint(m: Fields, k: string): number {
  const v = m[k];
  if (typeof v === "number" && Number.isSafeInteger(v) && v >= 0) return v;
  if (typeof v === "bigint" && v >= 0n && v <= BigInt(Number.MAX_SAFE_INTEGER)) return Number(v);
  return bad(`${String(m.t)}.${k} is not a uint below 2^53`);
}

function optUint(m: Fields, k: string, dflt: number): number {
  return m[k] === undefined || m[k] === null ? dflt : uint(m, k);
}

function uint64(m: Fields, k: string): bigint {
  const v = m[k];
  if (typeof v === "bigint" && v >= 0n) return v;
  if (typeof v === "number" && Number.isSafeInteger(v) && v >= 0) return BigInt(v);
  return bad(`${String(m.t)}.${k} is not a uint64`);
}

function bytes(m: Fields, k: string): Uint8Array {
  const v = m[k];
  if (v instanceof Uint8Array) return v;
  if (typeof v === "string") return new TextEncoder().encode(v);
  return bad(`${String(m.t)}.${k} is not bin`);
}

function headers(m: Fields): Record<string, string> | undefined {
  const v = m.headers;
  if (v === undefined || v === null) return undefined;
  if (typeof v !== "object" || v instanceof Uint8Array || Array.isArray(v)) bad("msg.headers is not a map");
  for (const x of Object.values(v as Fields)) if (typeof x !== "string") bad("msg.headers is not str -> str");
  return v as Record<string, string>;
}

/**
 * Decode one server message. Returns null for a message type this client
 * does not know (the protocol says to ignore those); throws ArqError
 * "protocol" for anything malformed. Unknown keys are ignored.
 */
export function decode(data: Uint8Array): ServerMessage | null {
  let raw: unknown;
  try {
    raw = decoder.decode(data);
  } catch (e) {
    bad(`undecodable msgpack (${(e as Error).message})`);
  }
  if (typeof raw !== "object" || raw === null || Array.isArray(raw) || raw instanceof Uint8Array) {
    bad("message is not a map");
  }
  const m = raw as Fields;
  switch (str(m, "t")) {
    case "welcome": {
      const subs = m.subs ?? [];
      if (!Array.isArray(subs)) bad("welcome.subs is not an array");
      return {
        t: "welcome",
        session: str(m, "session"),
        resumeToken: str(m, "resume_token"),
        resumed: m.resumed === true,
        subs: (subs as unknown[]).map((e) => {
          if (typeof e !== "object" || e === null) bad("welcome.subs entry is not a map");
          const s = e as Fields;
          return { stream: str(s, "stream"), epoch: uint64(s, "epoch"), acked: uint(s, "acked"), next: uint(s, "next") };
        }),
        maxPayload: optUint(m, "max_payload", 1 << 20),
        maxInflight: optUint(m, "max_inflight", 1024) || 1024,
      };
    }
    case "subok":
      return {
        t: "subok",
        id: uint(m, "id"),
        stream: str(m, "stream"),
        epoch: uint64(m, "epoch"),
        first: uint(m, "first"),
        next: uint(m, "next"),
      };
    case "unsubok":
      return { t: "unsubok", id: uint(m, "id") };
    case "puback":
      return { t: "puback", id: uint(m, "id"), offset: uint(m, "offset"), dup: m.dup === true };
    case "nack":
      return { t: "nack", id: uint(m, "id"), code: uint(m, "code"), reason: optStr(m, "reason", "") };
    case "error":
      return {
        t: "error",
        id: m.id === undefined || m.id === null ? undefined : uint(m, "id"),
        code: uint(m, "code"),
        reason: optStr(m, "reason", ""),
      };
    case "msg":
      return {
        t: "msg",
        stream: str(m, "stream"),
        offset: uint(m, "offset"),
        ts: optUint(m, "ts", 0),
        payload: bytes(m, "payload"),
        headers: headers(m),
      };
    case "gap": {
      const from = uint(m, "from");
      const to = uint(m, "to");
      if (to < from) bad("gap.to < gap.from");
      return { t: "gap", stream: str(m, "stream"), from, to };
    }
    default:
      return null;
  }
}

const STREAM_RE = /^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$/;

/** docs/protocol.md section 3: 1-200 bytes of A-Z a-z 0-9 . _ -, dot-separated. */
export function validStream(s: string): boolean {
  return typeof s === "string" && s.length >= 1 && s.length <= 200 && STREAM_RE.test(s);
}
