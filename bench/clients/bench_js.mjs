#!/usr/bin/env node
/**
 * bench/clients/bench_js.mjs - arq-client (clients/js, the built dist/) as a
 * Node application uses it, timed: the JS row of bench/clients.sh
 * (docs/benchmarks.md, "Client libraries"). The options, the modes and the
 * JSON line are those of bench_py.py, whose header describes them.
 *
 * Usage: node bench_js.mjs --url URL --prefix PREFIX --mode publish|delivery|reconnect
 *                          [--count N] [--size BYTES] [--window W] [--warmup M]
 *                          [--cuts K] [--control HOST:PORT] [--server-pid PID]
 *                          [--timeout SEC]
 */
import { readFileSync } from "node:fs";
import { connect as netConnect } from "node:net";
import { parseArgs } from "node:util";

import { ArqClient, VERSION } from "../../clients/js/dist/index.js";

class Failure extends Error {}

const nowNs = () => process.hrtime.bigint(); // CLOCK_MONOTONIC, as cut_proxy.py's time.monotonic_ns()

/** arqd's user + system CPU seconds so far, or null. /proc counts in USER_HZ, 100 on Linux. */
function serverCpuS(pid) {
  if (pid === undefined) return null;
  try {
    const f = readFileSync(`/proc/${pid}/stat`, "utf8");
    const fields = f.slice(f.lastIndexOf(")") + 1).trim().split(/\s+/);
    return (Number(fields[11]) + Number(fields[12])) / 100;
  } catch {
    return null;
  }
}

/** Wall time, this process's CPU and arqd's CPU over a timed part. */
class Timed {
  constructor(pid) {
    this.pid = pid;
    this.t0 = nowNs();
    this.c0 = process.cpuUsage();
    this.s0 = serverCpuS(pid);
  }
  stop() {
    this.seconds = Number(nowNs() - this.t0) / 1e9;
    const c = process.cpuUsage(this.c0);
    this.cpu = (c.user + c.system) / 1e6;
    const s1 = serverCpuS(this.pid);
    this.server = this.s0 === null || s1 === null ? null : (s1 - this.s0) / this.seconds;
  }
}

/**
 * n publishes of data to stream, at most window of them waiting for a
 * puback; resolves once every puback is in. The stream is new: each puback
 * must be a new offset in 1..n.
 */
function publishN(client, stream, n, data, window, msgidPrefix) {
  return new Promise((resolve, reject) => {
    let sent = 0;
    let acked = 0;
    let failed = false;
    const seen = new Uint8Array(n + 1); // offsets 1..n, each once
    const onAck = (a) => {
      if (failed) return;
      if (a.dup || a.offset < 1 || a.offset > n || seen[a.offset]) {
        failed = true;
        reject(new Failure(`publish to '${stream}': offset ${a.offset} unexpected or twice (a new stream has 1..${n})`));
        return;
      }
      seen[a.offset] = 1;
      acked++;
      if (sent < n) send();
      if (acked === n) resolve();
    };
    const onErr = (e) => {
      if (failed) return;
      failed = true;
      reject(new Failure(`publish to '${stream}' failed: ${e.message}`));
    };
    const send = () => {
      client.publish(stream, data, { msgid: `${msgidPrefix}-${sent}` }).then(onAck, onErr);
      sent++;
    };
    if (n === 0) resolve();
    for (let i = 0; i < Math.min(window, n); i++) send();
  });
}

/**
 * Subscribe to stream from earliest and wait for offsets 1..n, in order.
 * With timed, resolves with the Timed clock run from the subscribe call to
 * the n-th message.
 */
function receiveN(client, stream, n, size, serverPid, timed) {
  return new Promise((resolve, reject) => {
    let expect = 1;
    let done = false;
    const t = timed ? new Timed(serverPid) : null;
    const sub = client.subscribe(stream, {
      from: "earliest",
      onMessage: (m) => {
        if (done) return;
        if (m.offset !== expect || m.payload.length !== size) {
          done = true;
          reject(new Failure(`'${stream}': offset ${m.offset} (${m.payload.length} bytes) where ${expect} (${size} bytes) was due`));
          return;
        }
        expect++;
        if (expect > n) {
          done = true;
          t?.stop();
          resolve(t);
        }
      },
    });
    sub.ready.catch((e) => {
      if (!done) reject(new Failure(`subscribe to '${stream}' refused: ${e.message}`));
      done = true;
    });
  });
}

const round = (x, d) => Math.round(x * 10 ** d) / 10 ** d;

function rateResult(a, mode, t) {
  return {
    mode,
    count: a.count,
    size: a.size,
    window: a.window,
    seconds: round(t.seconds, 6),
    msgs_per_s: round(a.count / t.seconds, 1),
    cpu_s: round(t.cpu, 4),
    cpu_us_per_msg: round((t.cpu / a.count) * 1e6, 3),
    server_cpu: t.server === null ? null : round(t.server, 3),
  };
}

async function connected(url, opts = {}) {
  const c = new ArqClient({ url, ...opts });
  await c.connect();
  return c;
}

async function modePublish(a, data) {
  const c = await connected(a.url);
  try {
    await publishN(c, `${a.prefix}.pub.warm`, a.warmup, data, a.window, `${a.prefix}-pw`);
    const t = new Timed(a.serverPid);
    await publishN(c, `${a.prefix}.pub`, a.count, data, a.window, `${a.prefix}-p`);
    t.stop();
    return rateResult(a, "publish", t);
  } finally {
    await c.close();
  }
}

async function modeDelivery(a, data) {
  const p = await connected(a.url);
  try {
    await publishN(p, `${a.prefix}.del`, a.count, data, a.window, `${a.prefix}-d`);
    await publishN(p, `${a.prefix}.del.warm`, a.warmup, data, a.window, `${a.prefix}-dw`);
  } finally {
    await p.close();
  }
  const c = await connected(a.url);
  try {
    if (a.warmup) await receiveN(c, `${a.prefix}.del.warm`, a.warmup, a.size);
    const t = await receiveN(c, `${a.prefix}.del`, a.count, a.size, a.serverPid, true);
    return rateResult(a, "delivery", t);
  } finally {
    await c.close();
  }
}

/** Nearest rank: the smallest sample with at least p% of them at or below it. */
const percentile = (sorted, p) => sorted[Math.max(0, Math.ceil((p / 100) * sorted.length) - 1)];
const median = (s) => (s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2);

/** A line-reading connection to the cut proxy's control port. */
function controlConnection(hostPort) {
  const i = hostPort.lastIndexOf(":");
  const sock = netConnect({ host: hostPort.slice(0, i), port: Number(hostPort.slice(i + 1)) });
  sock.setNoDelay(true);
  let buf = "";
  let waiter = null;
  sock.on("data", (d) => {
    buf += d.toString();
    const nl = buf.indexOf("\n");
    if (nl >= 0 && waiter) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      const w = waiter;
      waiter = null;
      w.resolve(line);
    }
  });
  sock.on("error", (e) => waiter?.reject(e));
  const ready = new Promise((res, rej) => {
    sock.once("connect", res);
    sock.once("error", rej);
  });
  return {
    ready,
    cut: () =>
      new Promise((resolve, reject) => {
        waiter = { resolve, reject };
        sock.write("cut\n");
      }),
    close: () => sock.destroy(),
  };
}

async function modeReconnect(a, data) {
  if (!a.control) throw new Failure("--mode reconnect needs --control HOST:PORT (the cut proxy)");
  const ctl = controlConnection(a.control);
  await ctl.ready;
  let nConnected = 0;
  const seen = {}; // state -> nowNs() of its last event
  let tConnected = 0n;
  let wake = null;
  const wakeUp = () => {
    const w = wake;
    wake = null;
    w?.();
  };
  const waitWake = () => new Promise((res) => (wake = res));
  let got = 0;
  const c = new ArqClient({ url: a.url, backoffBaseMs: 1, backoffCapMs: 10 });
  c.on("state", ({ to }) => {
    seen[to] = nowNs();
    if (to === "connected") {
      tConnected = nowNs();
      nConnected++;
    }
    wakeUp();
  });
  const stream = `${a.prefix}.rc`;
  const samples = [];
  const parts = { detect: [], backoff: [], handshake: [] };
  // one publish, back through the subscription: the subscription is live on this connection
  const roundTrip = async (i) => {
    const want = got + 1;
    await c.publish(stream, data, { msgid: `${a.prefix}-r-${i}` });
    while (got < want) await waitWake();
  };
  try {
    await c.connect();
    const sub = c.subscribe(stream, {
      from: "latest",
      onMessage: () => {
        got++;
        wakeUp();
      },
    });
    await sub.ready;
    for (let i = 0; i < a.cuts; i++) {
      await roundTrip(i);
      await new Promise((res) => setTimeout(res, 20));
      const before = nConnected;
      const resumed = c.stats.resumed;
      const line = (await ctl.cut()).split(" ");
      if (line.length !== 3 || line[0] !== "cut" || Number(line[2]) < 1) {
        throw new Failure(`cut proxy answered '${line.join(" ")}' (no connection to cut?)`);
      }
      const tCut = BigInt(line[1]);
      while (nConnected === before) {
        if (c.state === "failed" || c.state === "closed") throw new Failure(`client ${c.state} after cut ${i + 1}`);
        await waitWake();
      }
      samples.push(Number(tConnected - tCut));
      parts.detect.push(Number(seen.disconnected - tCut));
      parts.backoff.push(Number(seen.reconnecting - seen.disconnected));
      parts.handshake.push(Number(tConnected - seen.reconnecting));
      if (c.stats.resumed !== resumed + 1) throw new Failure(`cut ${i + 1}: the welcome did not resume the session`);
    }
    await roundTrip(a.cuts); // and once more after the last cut
  } finally {
    await c.close();
    ctl.close();
  }
  const ms = samples.map((x) => x / 1e6).sort((x, y) => x - y);
  const medianMs = (xs) => median(xs.map((x) => x / 1e6).sort((x, y) => x - y));
  return {
    mode: "reconnect",
    cuts: a.cuts,
    size: a.size,
    resumed: c.stats.resumed,
    median_ms: round(median(ms), 3),
    p90_ms: round(percentile(ms, 90), 3),
    min_ms: round(ms[0], 3),
    max_ms: round(ms[ms.length - 1], 3),
    detect_ms: round(medianMs(parts.detect), 3),
    backoff_ms: round(medianMs(parts.backoff), 3),
    handshake_ms: round(medianMs(parts.handshake), 3),
    samples_ms: samples.map((x) => round(x / 1e6, 3)),
  };
}

function usage(msg) {
  process.stderr.write(
    `bench_js: ${msg}\n` +
      "usage: node bench_js.mjs --url URL --prefix PREFIX --mode publish|delivery|reconnect\n" +
      "         [--count N] [--size BYTES] [--window W] [--warmup M] [--cuts K]\n" +
      "         [--control HOST:PORT] [--server-pid PID] [--timeout SEC]\n",
  );
  process.exit(2);
}

function parse() {
  let v;
  try {
    ({ values: v } = parseArgs({
      options: {
        url: { type: "string" },
        prefix: { type: "string" },
        mode: { type: "string" },
        count: { type: "string", default: "20000" },
        size: { type: "string", default: "100" },
        window: { type: "string", default: "10000" },
        warmup: { type: "string", default: "1000" },
        cuts: { type: "string", default: "20" },
        control: { type: "string" },
        "server-pid": { type: "string" },
        timeout: { type: "string", default: "120" },
      },
    }));
  } catch (e) {
    usage(e.message);
  }
  if (!v.url || !v.prefix || !["publish", "delivery", "reconnect"].includes(v.mode)) {
    usage("--url, --prefix and --mode publish|delivery|reconnect are required");
  }
  const int = (name) => {
    const x = Number(v[name]);
    if (!Number.isSafeInteger(x)) usage(`--${name} must be an integer`);
    return x;
  };
  const a = {
    url: v.url,
    prefix: v.prefix,
    mode: v.mode,
    count: int("count"),
    size: int("size"),
    window: int("window"),
    warmup: int("warmup"),
    cuts: int("cuts"),
    control: v.control,
    serverPid: v["server-pid"] === undefined ? undefined : int("server-pid"),
    timeout: Number(v.timeout),
  };
  if (a.count < 1 || a.size < 0 || a.window < 1 || a.warmup < 0 || a.cuts < 1 || !(a.timeout > 0)) {
    usage("--count, --window, --cuts >= 1; --size, --warmup >= 0; --timeout > 0");
  }
  return a;
}

const a = parse();
const data = new Uint8Array(a.size).fill(0x78); // "xxx...", as the other drivers
const timer = setTimeout(() => {
  process.stderr.write(`bench_js: ${a.mode} not done within ${a.timeout} s\n`);
  process.exit(1);
}, a.timeout * 1000);
const run = { publish: modePublish, delivery: modeDelivery, reconnect: modeReconnect }[a.mode];
try {
  const r = await run(a, data);
  clearTimeout(timer);
  process.stdout.write(JSON.stringify({ client: "js", library: `arq-client ${VERSION}`, ...r }) + "\n");
} catch (e) {
  process.stderr.write(`bench_js: ${a.mode}: ${e.message}\n`);
  process.exit(1);
}
