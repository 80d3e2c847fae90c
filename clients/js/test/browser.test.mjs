// The demo page (clients/js/demo) in Debian's Chromium, headless, driven by
// playwright-core: it publishes and subscribes through arqd while this test
// cuts its connections (a TCP proxy of its own) and SIGKILLs and restarts
// arqd on the same port and data directory. Afterwards every acknowledged
// message is shown exactly once, in order.
//
// ARQD (environment): the arqd to run. ARQ_DEMO_SCREENSHOT: where to save a
// screenshot of the page at the end (docs/img/js-demo.png is made so).
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, statSync } from "node:fs";
import { createServer as createHttp } from "node:http";
import { createServer as createTcp, connect } from "node:net";
import { tmpdir } from "node:os";
import { extname, join, normalize } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

import { chromium } from "playwright-core";

const JS_ROOT = fileURLToPath(new URL("..", import.meta.url));
const MESSAGES = 40;

// origin: the demo page's origin, which arqd must allow (by default it
// takes WebSocket connections only from pages it served itself).
function startArqd(dataDir, origin, port = 0) {
  const proc = spawn(process.env.ARQD, ["--host", "127.0.0.1", "--port", String(port), "--data-dir", dataDir,
    "--anonymous", "--set", `auth.origins=${origin}`], { stdio: ["ignore", "pipe", "ignore"] });
  return new Promise((resolve, reject) => {
    proc.stdout.once("data", (b) => {
      const m = /ws:\/\/127\.0\.0\.1:(\d+)\/ws/.exec(String(b));
      if (m) resolve({ proc, port: Number(m[1]) });
      else reject(new Error(`arqd did not start: ${b}`));
    });
    proc.once("exit", (code) => reject(new Error(`arqd exited (${code})`)));
  });
}

/** A TCP proxy to target(); cut() resets every live connection (both sides get a RST). */
function startProxy(target) {
  const live = new Set();
  const server = createTcp((client) => {
    const up = connect(target(), "127.0.0.1");
    live.add(client).add(up);
    client.pipe(up).pipe(client);
    const end = () => {
      client.destroy();
      up.destroy();
      live.delete(client);
      live.delete(up);
    };
    client.on("error", end).on("close", end);
    up.on("error", end).on("close", end);
  });
  return new Promise((resolve) =>
    server.listen(0, "127.0.0.1", () =>
      resolve({
        port: server.address().port,
        cut: () => {
          for (const s of live) s.resetAndDestroy();
          return live.size;
        },
        close: () => server.close(),
      })));
}

/** Serves clients/js (demo/, dist/, node_modules/@msgpack) read-only. */
function startHttp() {
  const types = { ".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript", ".map": "application/json" };
  const server = createHttp((req, res) => {
    const path = normalize(decodeURIComponent(new URL(req.url, "http://x").pathname));
    const file = join(JS_ROOT, path);
    if (!file.startsWith(JS_ROOT) || !/^\/(demo|dist|node_modules\/@msgpack)\//.test(path)) {
      res.writeHead(404).end();
      return;
    }
    try {
      statSync(file);
      res.writeHead(200, { "Content-Type": types[extname(file)] ?? "application/octet-stream" }).end(readFileSync(file));
    } catch {
      res.writeHead(404).end();
    }
  });
  return new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve(server)));
}

test("the demo page shows every acknowledged message once, in order, through cuts and arqd SIGKILLs", async (t) => {
  assert.ok(process.env.ARQD, "ARQD must name the arqd binary");
  const tmp = mkdtempSync(join(tmpdir(), "arq-browser-"));
  const data = join(tmp, "data");
  const http = await startHttp();
  const origin = `http://127.0.0.1:${http.address().port}`;
  let arqd = await startArqd(data, origin);
  const port = arqd.port;
  const proxy = await startProxy(() => port);
  // Debian's Chromium, never a downloaded one; playwright gives it a fresh
  // temporary profile (--user-data-dir) of its own and runs it headless.
  const browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync"],
  });
  t.after(async () => {
    await browser.close();
    http.close();
    proxy.close();
    arqd.proc.kill("SIGKILL");
    rmSync(tmp, { recursive: true, force: true });
  });
  const page = await browser.newPage({ viewport: { width: 760, height: 640 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  const room = "chat.browser";
  await page.goto(`http://127.0.0.1:${http.address().port}/demo/index.html?ws=ws://127.0.0.1:${proxy.port}/ws&room=${room}`);
  await page.evaluate(() => window.demo.connected);

  let cuts = 0;
  for (let i = 0; i < MESSAGES; i++) {
    // Not awaited: the page keeps publishing while the network breaks.
    await page.evaluate((text) => void window.demo.send(text), `message ${i}`);
    // Each fault hits a live connection (one cut during the reconnect after
    // another fault would not make a reconnect of its own).
    if (i === 10 || i === 20 || i === 30)
      await page.waitForFunction(() => window.demo.client.state === "connected", null, { timeout: 60_000 });
    if (i === 10 || i === 30) cuts += proxy.cut();
    if (i === 20) {
      arqd.proc.kill("SIGKILL");
      await new Promise((r) => arqd.proc.once("exit", r));
      arqd = await startArqd(data, origin, port);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  await page.waitForFunction((n) => window.demo.acked.length === n, MESSAGES, { timeout: 60_000 });
  const acked = await page.evaluate(() => window.demo.acked);
  const top = Math.max(...acked.map(([o]) => o));
  await page.waitForFunction((top) => window.demo.received.some(([o]) => o === top), top, { timeout: 60_000 });
  const { received, stats } = await page.evaluate(() => ({ received: window.demo.received, stats: window.demo.client.stats }));

  assert.ok(cuts >= 2, `connections were cut (${cuts})`);
  assert.ok(stats.reconnects >= 3, `the page reconnected after each cut and the restart (${JSON.stringify(stats)})`);
  assert.deepEqual(received.map(([o]) => o), Array.from({ length: received.length }, (_, k) => k + 1),
    "offsets 1, 2, 3... each once, in order");
  const shown = new Map(received);
  for (const [offset, text] of acked) assert.equal(shown.get(offset), text, `acked message at ${offset} shown`);
  assert.deepEqual([...new Set(received.map(([, x]) => x))].length, received.length, "no message shown twice");
  assert.equal(received.length, MESSAGES, "exactly the acked messages");
  const rows = await page.locator("#messages li").count();
  assert.equal(rows, MESSAGES, "the page's list holds each message once");
  assert.deepEqual(errors, []);
  await page.locator("#state.connected").waitFor();
  if (process.env.ARQ_DEMO_SCREENSHOT) await page.screenshot({ path: process.env.ARQ_DEMO_SCREENSHOT });
});
