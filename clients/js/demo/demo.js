// The chat page of docs/clients.md: publishes and subscribes through arqd
// with arq-client. ?ws=ws://HOST:PORT/ws&room=STREAM choose the server and
// the stream. window.demo is what the browser test (test/browser.test.mjs) reads.
import { ArqClient, localStorageSession } from "../dist/index.js";

const params = new URLSearchParams(location.search);
const url = params.get("ws") ?? `ws://${location.hostname}:8000/ws`;
const room = params.get("room") ?? "chat.demo";
const $ = (id) => document.getElementById(id);
$("room").textContent = room;

const client = new ArqClient({ url, session: localStorageSession(`arq.session.${room}`) });
const received = []; // [offset, text], in the order shown
const acked = []; // [offset, text] of our own publishes, as their pubacks came

client.on("state", ({ to }) => {
  $("state").textContent = to;
  $("state").className = to;
});
client.on("gap", ({ from, to }) => show(`(messages ${from}-${to} no longer exist)`, "…"));

function show(text, offset) {
  const li = document.createElement("li");
  li.innerHTML = `<span class="off">#${offset}</span>`;
  li.append(text);
  $("messages").append(li);
  li.scrollIntoView({ block: "end" });
}

// Subscribe in the same turn as connect(), so a resumed session continues
// its subscription where it was acked.
const connected = client.connect();
client.subscribe(room, {
  from: "earliest",
  onMessage: (m) => {
    received.push([m.offset, m.text()]);
    show(m.text(), m.offset);
  },
});

async function send(text) {
  const ack = await client.publish(room, text); // resolves once durable, exactly once
  acked.push([ack.offset, text]);
  return ack.offset;
}

$("send").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("text").value.trim();
  if (text) void send(text);
  $("text").value = "";
});
setInterval(() => {
  const s = client.stats;
  $("stats").textContent = `${s.connects} connections, ${s.resumed} resumed, ` +
    `${s.redeliveriesDropped} redeliveries dropped, ${s.publishesResent} publishes re-sent`;
}, 200);

window.demo = { client, connected, send, received, acked };
