// The wire codec and the backoff: epochs as uint64 both ways, strict
// decoding of what the server sends, full-jitter bounds.
import assert from "node:assert/strict";
import { test } from "node:test";
import { encode as mpEncode } from "@msgpack/msgpack";

import { decode, encode, validStream } from "../../dist/codec.js";
import { backoffDelay } from "../../dist/index.js";

test("an epoch goes out as a msgpack uint64, exactly, however small or large", () => {
  for (const epoch of [1n, 2n ** 53n + 1n, 2n ** 64n - 1n]) {
    const bytes = encode({ t: "sub", id: 1, stream: "a", from: 5, epoch });
    const i = Buffer.from(bytes).indexOf(Buffer.from("epoch"));
    assert.equal(bytes[i + 5], 0xcf, "uint64 marker after the key");
    assert.equal(Buffer.from(bytes).readBigUInt64BE(i + 6), epoch);
  }
});

test("uint64 values from the server decode to exact bigints (epochs) and safe numbers (offsets)", () => {
  const big = 2n ** 64n - 2n;
  const w = decode(mpEncode({ t: "welcome", session: "s", resume_token: "r", resumed: true,
    subs: [{ stream: "a", epoch: big, acked: 3n, next: 4 }] }, { useBigInt64: true }));
  assert.equal(w.subs[0].epoch, big);
  assert.equal(w.subs[0].acked, 3);
  const ok = decode(mpEncode({ t: "subok", id: 1, stream: "a", epoch: 7, first: 1, next: 1 }));
  assert.equal(ok.epoch, 7n, "a small epoch is a bigint too");
  assert.throws(() => decode(mpEncode({ t: "msg", stream: "a", offset: 2n ** 60n, payload: new Uint8Array() },
    { useBigInt64: true })), { code: "protocol" }, "an offset past 2^53 is refused, not rounded");
});

test("malformed server messages are protocol errors; unknown types are ignored", () => {
  assert.throws(() => decode(mpEncode({ t: "puback", id: -1, offset: 1 })), { code: "protocol" });
  assert.throws(() => decode(mpEncode({ t: "msg", stream: "a", offset: "1", payload: new Uint8Array() })), { code: "protocol" });
  assert.throws(() => decode(mpEncode({ t: "gap", stream: "a", from: 5, to: 4 })), { code: "protocol" });
  assert.throws(() => decode(mpEncode([1, 2])), { code: "protocol" });
  assert.throws(() => decode(new Uint8Array([0xc1])), { code: "protocol" });
  assert.equal(decode(mpEncode({ t: "future-thing", x: 1 })), null);
  const m = decode(mpEncode({ t: "msg", stream: "a", offset: 3, ts: 1700000000000000, payload: "hi", extra: [1] }));
  assert.deepEqual([m.offset, m.ts, new TextDecoder().decode(m.payload)], [3, 1700000000000000, "hi"]);
});

test("stream names follow docs/protocol.md section 3", () => {
  for (const s of ["chat.room42", "user.17.inbox", "a", "A-b_c"]) assert.ok(validStream(s), s);
  for (const s of ["", ".a", "a.", "a..b", "a b", "x".repeat(201), "é"]) assert.ok(!validStream(s), s);
});

test("backoff: full jitter in [0, min(cap, base * 2^n)]", () => {
  assert.equal(backoffDelay(0, 100, 10_000, () => 0), 0);
  assert.equal(backoffDelay(0, 100, 10_000, () => 0.99999999), 100);
  assert.equal(backoffDelay(3, 100, 10_000, () => 0.99999999), 800);
  assert.equal(backoffDelay(20, 100, 10_000, () => 0.99999999), 10_000);
  assert.equal(backoffDelay(5000, 100, 10_000, () => 0.99999999), 10_000, "no overflow for large n");
  const seen = new Set(Array.from({ length: 200 }, () => backoffDelay(2, 100, 10_000)));
  assert.ok(seen.size > 50 && Math.max(...seen) <= 400, "spread over the interval");
});
