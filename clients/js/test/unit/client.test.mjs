// ArqClient's state machine against a scripted in-process server
// (fake-server.mjs): what it sends, when, and what the application sees.
import assert from "node:assert/strict";
import { test } from "node:test";

import { ArqClient, localStorageSession } from "../../dist/index.js";
import { FakeServer, tick } from "./fake-server.mjs";

function client(srv, opts = {}) {
  return new ArqClient({ url: "ws://fake/ws", WebSocket: srv.WebSocket, backoffBaseMs: 1, backoffCapMs: 2, ...opts });
}

test("publishes queue while connecting, then one puback resolves each; maxPending bounds the queue", async () => {
  const srv = new FakeServer();
  const c = client(srv, { maxPending: 2 });
  const connected = c.connect();
  const p1 = c.publish("chat.a", "one");
  const p2 = c.publish("chat.a", new Uint8Array([1, 2]), { msgid: "m-2", headers: { k: "v" } });
  await assert.rejects(c.publish("chat.a", "three"), { code: "full" });
  const [conn, hello] = await srv.accept(0);
  await connected;
  assert.equal(hello.t, "hello");
  assert.equal(conn.protocols, "arq.v1");
  const a = await conn.recvType("pub");
  const b = await conn.recvType("pub");
  assert.equal(new TextDecoder().decode(a.payload), "one");
  assert.deepEqual([b.msgid, b.headers], ["m-2", { k: "v" }]);
  assert.ok(a.msgid && a.msgid !== b.msgid, "a generated msgid");
  conn.push({ t: "puback", id: b.id, stream: "chat.a", offset: 2, dup: false });
  conn.push({ t: "puback", id: a.id, stream: "chat.a", offset: 1, dup: false });
  conn.push({ t: "puback", id: a.id, stream: "chat.a", offset: 9, dup: false }); // stray repeat: ignored
  assert.deepEqual([(await p1).offset, (await p2).offset], [1, 2]);
  await assert.rejects(c.publish("chat.a", new Uint8Array(2000)), { code: "too-big" });
  await assert.rejects(c.publish("bad..name", "x"), { code: "invalid" });
  await c.close();
  assert.equal(c.state, "closed");
});

test("several URLs: a failed attempt or a lost connection moves to the next, and the session resumes there", async () => {
  const srv = new FakeServer();
  assert.throws(() => new ArqClient({ url: [], WebSocket: srv.WebSocket }), { code: "invalid" });
  assert.throws(() => new ArqClient({ url: ["ws://a/ws", "http://b"], WebSocket: srv.WebSocket }), { code: "invalid" });
  const c = client(srv, { url: ["ws://a/ws", "ws://b/ws"] });
  const connected = c.connect();
  const first = await srv.conn(0);
  assert.equal(first.url, "ws://a/ws");
  first.drop(1006); // node a down: the attempt fails
  const [second] = await srv.accept(1);
  await connected;
  assert.equal(second.url, "ws://b/ws");
  assert.equal(c.url, "ws://b/ws");
  second.drop(1006); // b lost after the welcome: back to a, resuming
  const [third, hello] = await srv.accept(2);
  assert.equal(third.url, "ws://a/ws");
  assert.equal(hello.session, "s1");
  await c.close();
});

test("publish ack level: sent as pub.ack when given, absent otherwise, anything else refused", async () => {
  const srv = new FakeServer();
  const c = client(srv);
  const connected = c.connect();
  const [conn] = await srv.accept(0);
  await connected;
  await assert.rejects(c.publish("s", "x", { ack: "quorum" }), { code: "invalid" });
  const p1 = c.publish("s", "r", { ack: "replicated" });
  const p2 = c.publish("s", "d");
  const a = await conn.recvType("pub");
  const b = await conn.recvType("pub");
  assert.equal(a.ack, "replicated");
  assert.equal("ack" in b, false, "absent: the server's wal.ack");
  conn.push({ t: "puback", id: a.id, stream: "s", offset: 1, dup: false });
  conn.push({ t: "puback", id: b.id, stream: "s", offset: 2, dup: false });
  assert.deepEqual([(await p1).offset, (await p2).offset], [1, 2]);
  await c.close();
});

test("after a lost connection: resume, the publish re-sent byte for byte, redeliveries dropped, acks caught up", async () => {
  const srv = new FakeServer();
  const c = client(srv);
  const states = [];
  c.on("state", (e) => states.push(e.to));
  const connected = c.connect();
  const [conn] = await srv.accept(0);
  await connected;
  const seen = [];
  const sub = c.subscribe("chat.a", { from: "earliest", onMessage: (m) => seen.push(m.offset) });
  const s = await conn.recvType("sub");
  conn.push({ t: "subok", id: s.id, stream: "chat.a", epoch: 2n ** 63n + 1n, first: 1, next: 1 });
  assert.equal((await sub.ready).epoch, 2n ** 63n + 1n);
  for (const o of [1, 2, 3]) conn.push({ t: "msg", stream: "chat.a", offset: o, ts: 1, payload: new Uint8Array([o]) });
  const pub = c.publish("chat.a", "lost");
  const first = await conn.recvType("pub");
  conn.drop(); // the puback never comes
  assert.equal(c.state, "disconnected");

  const [conn2, hello2] = await srv.accept(1, {
    resumed: true, subs: [{ stream: "chat.a", epoch: 2n ** 63n + 1n, acked: 1, next: 5 }],
  });
  assert.deepEqual([hello2.session, hello2.resume_token], ["s1", "rt1"]);
  const again = await conn2.recvType("pub");
  assert.deepEqual(again.raw, first.raw, "the same frame: same id and msgid");
  conn2.push({ t: "puback", id: again.id, stream: "chat.a", offset: 4, dup: true });
  assert.deepEqual(await pub, { stream: "chat.a", offset: 4, dup: true, msgid: first.msgid });
  // The server restarts after its acked offset 1: 2 and 3 again, then 4.
  for (const o of [2, 3, 4]) conn2.push({ t: "msg", stream: "chat.a", offset: o, ts: 1, payload: new Uint8Array([o]) });
  const acks = [];
  while (acks.at(-1) !== 4) acks.push((await conn2.recvType("ack")).offset);
  assert.deepEqual(acks, [3, 4], "acks catch up with the redeliveries, to what the application processed");
  assert.deepEqual(seen, [1, 2, 3, 4], "each offset once, in order");
  assert.equal(c.stats.redeliveriesDropped, 2);
  assert.equal(c.stats.publishesResent, 1);
  assert.deepEqual(states, ["connecting", "connected", "disconnected", "reconnecting", "recovering", "connected"]);
  await c.close();
});

test("a subscription not restored is sent again from the next offset with its epoch (uint64)", async () => {
  const srv = new FakeServer();
  const c = client(srv);
  const connected = c.connect();
  const [conn] = await srv.accept(0);
  await connected;
  c.subscribe("chat.a", { from: 1, onMessage: () => {} });
  const s = await conn.recvType("sub");
  conn.push({ t: "subok", id: s.id, stream: "chat.a", epoch: 2n ** 64n - 1n, first: 1, next: 3 });
  conn.push({ t: "msg", stream: "chat.a", offset: 1, ts: 1, payload: new Uint8Array() });
  conn.push({ t: "msg", stream: "chat.a", offset: 2, ts: 1, payload: new Uint8Array() });
  conn.drop(1001);
  const [conn2] = await srv.accept(1, { session: "s2" }); // not resumed
  const re = await conn2.recvType("sub");
  assert.deepEqual([re.from, re.epoch], [3, 2n ** 64n - 1n]);
  const epochs = [];
  c.on("epoch", (e) => epochs.push([e.oldEpoch, e.newEpoch]));
  conn2.push({ t: "nack", id: re.id, code: 409, reason: "epoch mismatch" });
  const fresh = await conn2.recvType("sub");
  assert.deepEqual([fresh.from, fresh.epoch], ["earliest", undefined], "history reset: from the start, no epoch");
  conn2.push({ t: "subok", id: fresh.id, stream: "chat.a", epoch: 5, first: 1, next: 1 });
  await tick();
  assert.deepEqual(epochs, [[2n ** 64n - 1n, 5n]]);
  await c.close();
});

test("close 4001 ends the client without reconnecting; a refused token provider gets one more chance", async () => {
  const srv = new FakeServer();
  const c = client(srv);
  const connected = c.connect();
  const [conn] = await srv.accept(0);
  await connected;
  const pending = c.publish("chat.a", "x");
  conn.drop(4001);
  await assert.rejects(pending, { code: "session-taken" });
  assert.equal(c.state, "failed");
  await tick();
  assert.equal(srv.conns.length, 1, "no reconnection");

  const srv2 = new FakeServer();
  const asked = [];
  const c2 = client(srv2, { token: () => (asked.push("t1"), "t1") });
  const failed = c2.connect();
  failed.catch(() => {});
  const first = await srv2.conn(0);
  first.open();
  assert.equal((await first.recv()).token, "t1");
  first.push({ t: "error", code: 401, reason: "expired" });
  first.drop(1008);
  await assert.rejects(failed, { code: "server", status: 401 });
  assert.equal(srv2.conns.length, 1, "the provider gave the refused token again: no second attempt");
  assert.deepEqual(asked, ["t1", "t1"], "the same refused token twice: given up");
});

test("an async iterator yields in order and acks what was consumed; AbortSignal closes", async () => {
  const srv = new FakeServer();
  const ac = new AbortController();
  const c = client(srv, { signal: ac.signal, ackDelayMs: 1 });
  const connected = c.connect();
  const [conn] = await srv.accept(0);
  await connected;
  const sub = c.subscribe("chat.a", { from: "latest" });
  const s = await conn.recvType("sub");
  conn.push({ t: "subok", id: s.id, stream: "chat.a", epoch: 1, first: 1, next: 10 });
  for (const o of [10, 11, 12]) conn.push({ t: "msg", stream: "chat.a", offset: o, ts: 1, payload: new Uint8Array() });
  const got = [];
  for await (const m of sub) {
    got.push(m.offset);
    if (m.offset === 11) {
      const ack = await conn.recvType("ack");
      assert.equal(ack.offset, 10, "10 was consumed when 11 was asked for; 11 is not acked yet");
      break; // ends the subscription
    }
  }
  assert.deepEqual(got, [10, 11]);
  assert.equal((await conn.recvType("unsub")).stream, "chat.a");
  assert.throws(() => sub.ack(12), { code: "invalid" });
  const closed = new Promise((r) => c.on("state", (e) => e.to === "closed" && r()));
  ac.abort();
  await closed;
  await assert.rejects(c.publish("chat.a", "x"), { code: "closed" });
});

test("localStorageSession keeps the session across clients (a page reload)", async () => {
  const data = new Map();
  const storage = { getItem: (k) => data.get(k) ?? null, setItem: (k, v) => data.set(k, v) };
  const srv = new FakeServer();
  const c1 = client(srv, { session: localStorageSession("arq", storage) });
  const p = c1.connect();
  await srv.accept(0, { session: "kept", resume_token: "secret" });
  await p;
  await c1.close();
  const c2 = client(srv, { session: localStorageSession("arq", storage) });
  const p2 = c2.connect();
  const [, hello] = await srv.accept(1);
  await p2;
  assert.deepEqual([hello.session, hello.resume_token], ["kept", "secret"]);
  data.set("arq", "not json");
  assert.equal(localStorageSession("arq", storage).load(), null);
  await c2.close();
});
