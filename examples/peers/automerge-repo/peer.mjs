// The automerge-repo side of `causeway bench many-docs-sync`.
//
//   node peer.mjs populate DIR DOCS IDS_FILE
//       Creates DOCS documents in a repo with Node filesystem storage at DIR
//       ({n, owner}, then a second change adding state), flushes, and writes
//       their document ids, in order, to IDS_FILE.
//   node peer.mjs serve DIR
//       A sync server as @automerge/automerge-repo-sync-server builds one: a
//       repo on DIR with a WebSocket server adapter and `sharePolicy: false`
//       (it answers requests for documents it has, it announces nothing),
//       on an ephemeral port of 127.0.0.1. Prints {"ready": true, "port": P}.
//   node peer.mjs join DIR ADDR IDS_FILE DUMP_FILE WINDOW
//       A client repo with Node filesystem storage at DIR and a WebSocket
//       client adapter to ws://ADDR; finds every id in IDS_FILE, WINDOW at a
//       time, flushes storage, prints {"done": true, "found": N, "seconds": S},
//       waits for a line on stdin (or its end: the harness has read this
//       process's CPU time and peak memory), then writes every document's
//       contents to DUMP_FILE as {id: value} and prints {"dumped": N}.
//       (All 10,000 at once fails: some finds reject with "Document ... is
//       unavailable" after about 80 s.)
//   node peer.mjs find-latency URL_A URL_C DOCS
//       Two client repos without storage, on WebSocket URLs URL_A and URL_C
//       (the same server, or two nodes of a cluster): DOCS times, A creates
//       a document ({n, owner}) and C finds it at once; prints
//       {"find_ms": [...]}, the time of each find() in milliseconds.
//
// Settings are the libraries' defaults except the server's share policy,
// which is the sync server's.

import { readFileSync, writeFileSync } from "node:fs";
import { Repo } from "@automerge/automerge-repo";
import {
  NodeWSServerAdapter,
  WebSocketClientAdapter,
} from "@automerge/automerge-repo-network-websocket";
import { NodeFSStorageAdapter } from "@automerge/automerge-repo-storage-nodefs";
import { WebSocketServer } from "ws";

const [mode, ...args] = process.argv.slice(2);

// Stdout carries only the JSON lines below, which the benchmark parses. The
// libraries log with console.log (automerge-repo: "error receiving message"
// when a sync message fails to apply); send that to stderr, the peer's log.
console.log = console.error;

function print(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

async function populate(dir, docs, idsFile) {
  const repo = new Repo({ storage: new NodeFSStorageAdapter(dir), network: [] });
  const ids = [];
  for (let i = 0; i < docs; i++) {
    const handle = repo.create({ n: i, owner: `user-${i % 97}` });
    handle.change((d) => {
      d.state = "open";
    });
    ids.push(handle.documentId);
  }
  await repo.flush();
  writeFileSync(idsFile, JSON.stringify(ids));
  await repo.shutdown();
  print({ populated: docs });
}

// Connections that end are logged to stderr (the peer's log), with the
// seconds since the process started. The server adapter pings every client
// every 5 s (its default) and disconnects one that has not answered the
// previous ping; a busy event loop on either side can make that happen.
function logDisconnects(adapter, who) {
  adapter.on("peer-disconnected", ({ peerId }) => {
    const seconds = (performance.now() / 1000).toFixed(1);
    console.error(`${who}: connection to ${peerId} ended after ${seconds} s`);
  });
  return adapter;
}

function serve(dir) {
  const wss = new WebSocketServer({ port: 0, host: "127.0.0.1" });
  new Repo({
    network: [logDisconnects(new NodeWSServerAdapter(wss), "server")],
    storage: new NodeFSStorageAdapter(dir),
    sharePolicy: async () => false,
  });
  wss.on("listening", () => print({ ready: true, port: wss.address().port }));
}

// Resolves once stdin yields a line or ends.
function measured() {
  return new Promise((resolve) => {
    process.stdin.once("data", resolve);
    process.stdin.once("end", resolve);
    process.stdin.resume();
  });
}

async function join(dir, addr, idsFile, dumpFile, window) {
  const started = process.hrtime.bigint();
  const ids = JSON.parse(readFileSync(idsFile, "utf8"));
  const repo = new Repo({
    network: [logDisconnects(new WebSocketClientAdapter(`ws://${addr}`), "client")],
    storage: new NodeFSStorageAdapter(dir),
  });
  const handles = new Array(ids.length);
  let next = 0;
  async function finder() {
    while (next < ids.length) {
      const k = next++;
      handles[k] = await repo.find(ids[k]);
    }
  }
  await Promise.all(Array.from({ length: window }, finder));
  await repo.flush();
  const seconds = Number(process.hrtime.bigint() - started) / 1e9;
  print({ done: true, found: handles.length, seconds });
  await measured();
  const dump = {};
  for (const handle of handles) {
    dump[handle.documentId] = handle.doc();
  }
  writeFileSync(dumpFile, JSON.stringify(dump));
  print({ dumped: handles.length });
  process.exit(0);
}

async function findLatency(urlA, urlC, docs) {
  const a = new Repo({ network: [new WebSocketClientAdapter(urlA)] });
  const c = new Repo({ network: [new WebSocketClientAdapter(urlC)] });
  // Both connected before the clock starts: a first find() before the
  // handshake would be answered "unavailable" by the client itself.
  await Promise.all([a.networkSubsystem.whenReady(), c.networkSubsystem.whenReady()]);
  const findMs = [];
  for (let i = 0; i < docs; i++) {
    const handle = a.create({ n: i, owner: `user-${i % 97}` });
    const started = performance.now();
    await c.find(handle.url);
    findMs.push(performance.now() - started);
  }
  print({ find_ms: findMs });
  await a.shutdown();
  await c.shutdown();
  process.exit(0);
}

switch (mode) {
  case "find-latency":
    await findLatency(args[0], args[1], Number(args[2]));
    break;
  case "populate":
    await populate(args[0], Number(args[1]), args[2]);
    break;
  case "serve":
    serve(args[0]);
    break;
  case "join":
    await join(args[0], args[1], args[2], args[3], Number(args[4]));
    break;
  default:
    process.stderr.write(`unknown mode ${mode}; see the comment at the top of peer.mjs\n`);
    process.exit(2);
}
