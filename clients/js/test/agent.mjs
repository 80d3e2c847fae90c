// The JS client under the shared conformance suite (tests/clients/): reads
// commands as JSON lines on stdin, writes what the client reports as JSON
// lines on stdout. The protocol is described in tests/clients/README.md;
// clients/python/tests/agent.py is the same agent for the Python client.
//
// Usage: node agent.mjs [PATH_TO_DIST_INDEX_JS]
import { createInterface } from "node:readline";

const lib = await import(process.argv[2] ?? new URL("../dist/index.js", import.meta.url).href);
const { ArqClient, ArqError } = lib;

const out = (ev) => process.stdout.write(JSON.stringify(ev) + "\n");
const errEv = (e) => (e instanceof ArqError ? { code: e.code, status: e.status ?? null, message: e.message } : { code: "exception", status: null, message: String(e) });

let client = null;
const subs = new Map();

function connect(cmd) {
  let tokens = cmd.tokens ? [...cmd.tokens] : null;
  let calls = 0;
  const opts = {
    url: cmd.url,
    reconnect: cmd.reconnect ?? true,
    backoffBaseMs: cmd.backoff?.[0] ?? 10,
    backoffCapMs: cmd.backoff?.[1] ?? 300,
    maxRetries: cmd.max_retries ?? 0,
    maxPending: cmd.max_pending ?? 10000,
    // The application's own store: the suite reads the session from it (takeover).
    session: {
      load: () => null,
      save: (s) => out({ ev: "session", session: s.session, resume_token: s.resumeToken }),
    },
  };
  if (tokens) {
    // A provider: the next token for each attempt (the last one repeats).
    opts.token = async () => {
      calls++;
      out({ ev: "token", n: calls });
      return tokens.length > 1 ? tokens.shift() : tokens[0];
    };
  } else if (cmd.token) {
    opts.token = cmd.token;
  }
  client = new ArqClient(opts);
  client.on("state", (e) => out({ ev: "state", from: e.from, to: e.to, ...(e.error ? { error: errEv(e.error) } : {}) }));
  client.on("gap", (e) => out({ ev: "gap", stream: e.stream, from: e.from, to: e.to }));
  client.on("epoch", (e) => out({ ev: "epoch", stream: e.stream, old: e.oldEpoch.toString(), new: e.newEpoch.toString() }));
  client.on("error", (e) => out({ ev: "error", ...errEv(e) }));
  client.connect().then(
    () => out({ ev: "connected" }),
    (e) => out({ ev: "connect_failed", ...errEv(e) }),
  );
}

function subscribe(cmd) {
  const manual = cmd.ack === "none";
  let sub;
  try {
    sub = client.subscribe(cmd.stream, {
      from: cmd.from ?? "earliest",
      epoch: cmd.epoch !== undefined ? BigInt(cmd.epoch) : undefined,
      autoAck: !manual,
      onMessage: (m) => out({ ev: "msg", stream: m.stream, offset: m.offset, payload: m.text() }),
    });
  } catch (e) {
    out({ ev: "subfail", stream: cmd.stream, ...errEv(e) });
    return;
  }
  subs.set(cmd.stream, sub);
  sub.ready.then(
    (i) => out({ ev: "subok", stream: cmd.stream, epoch: i.epoch.toString(), first: i.first, next: i.next }),
    (e) => out({ ev: "subfail", stream: cmd.stream, ...errEv(e) }),
  );
}

function publish(stream, payload, msgid, tag) {
  client.publish(stream, payload, msgid ? { msgid } : {}).then(
    (a) => out({ ev: "puback", tag, stream: a.stream, offset: a.offset, dup: a.dup, msgid: a.msgid }),
    (e) => out({ ev: "puberr", tag, ...errEv(e) }),
  );
}

// Publisher p of a chaos run: message j to stream prefix.(j % n), payload
// "run:p:j", msgid "run-p-j", at most depth in flight, at most rate per second.
async function publishMany(cmd) {
  const pause = cmd.rate ? 1000 / cmd.rate : 0;
  let inflight = 0;
  let wake = null;
  const all = [];
  for (let j = 0; j < cmd.count; j++) {
    while (inflight >= cmd.depth) await new Promise((r) => (wake = r));
    if (pause) await new Promise((r) => setTimeout(r, pause));
    inflight++;
    const stream = `${cmd.prefix}.${j % cmd.streams}`;
    all.push(
      client
        .publish(stream, `${cmd.run}:${cmd.p}:${j}`, { msgid: `${cmd.run}-${cmd.p}-${j}` })
        .then(
          (a) => out({ ev: "puback", tag: j, stream, offset: a.offset, dup: a.dup, msgid: a.msgid }),
          (e) => out({ ev: "puberr", tag: j, ...errEv(e) }),
        )
        .finally(() => {
          inflight--;
          wake?.();
          wake = null;
        }),
    );
  }
  await Promise.all(all);
  out({ ev: "published" });
}

const handlers = {
  connect,
  subscribe,
  ack: (cmd) => {
    try {
      subs.get(cmd.stream).ack(cmd.offset);
    } catch (e) {
      out({ ev: "error", ...errEv(e) });
    }
  },
  publish: (cmd) => publish(cmd.stream, cmd.payload, cmd.msgid, cmd.tag),
  publish_many: (cmd) => void publishMany(cmd),
  stats: () => {
    const s = client.stats;
    out({ ev: "stats", state: client.state, connects: s.connects, reconnects: s.reconnects, resumed: s.resumed,
      redeliveries_dropped: s.redeliveriesDropped, publishes_resent: s.publishesResent, resubscribes: s.resubscribes,
      pending_publishes: s.pendingPublishes });
  },
  close: async () => {
    await client.close();
    out({ ev: "closed" });
  },
};

const rl = createInterface({ input: process.stdin });
rl.on("line", (line) => {
  if (!line.trim()) return;
  const cmd = JSON.parse(line);
  const h = handlers[cmd.cmd];
  if (!h) out({ ev: "error", code: "agent", message: `unknown command ${cmd.cmd}` });
  else h(cmd);
});
rl.on("close", () => process.exit(0));
out({ ev: "ready", client: "js" });
