// An automerge-repo client driven line by line by Causeway's interop tests
// (tests/interop.rs): the real @automerge/automerge-repo and
// -network-websocket, unchanged, against a real node.
//
//   node client.mjs URL [STORAGE_DIR]
//
// Connects a Repo to the WebSocket URL (with Node filesystem storage in
// STORAGE_DIR if given, else none) and then reads one JSON command per line
// on stdin, answering each with one JSON line on stdout:
//
//   {"cmd":"create","value":{...}}        -> {"id","heads"}
//   {"cmd":"find","id":ID}                -> {"heads","value","ms"} or {"unavailable":true,"ms"}
//   {"cmd":"change","id":ID,"set":{...}}  -> {"heads"}  (assigns the keys)
//   {"cmd":"state","id":ID}               -> {"heads","value"} of the local copy
//   {"cmd":"wait","id":ID,"heads":[...],"timeout_ms":N}
//                                         -> {"heads","value","ok"}: waits for those heads
//   {"cmd":"broadcast","id":ID,"message":{...}} -> {}
//   {"cmd":"messages","id":ID}            -> {"messages":[...]} received so far
//   {"cmd":"make_doc"}                    -> {"changes","heads"}: a document made
//        with @automerge/automerge alone (every value kind, a concurrent
//        branch), its changes concatenated, base64
//   {"cmd":"load","changes":B64}          -> {"heads","value"}: what Automerge
//        loads from concatenated changes
//   {"cmd":"flush"}                       -> {}  (storage written: every
//        document saved and no storage write still running, so a kill
//        after the answer leaves no half-written file)
//   {"cmd":"quit"}                        -> exits
//
// Heads are hex change hashes. Values are shown as JSON with bytes as
// arrays of numbers, dates as milliseconds and counters as numbers, the
// way a Causeway node renders them.

import { createInterface } from "node:readline";
import { next as A } from "@automerge/automerge";
import { Repo } from "@automerge/automerge-repo";
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket";
import { NodeFSStorageAdapter } from "@automerge/automerge-repo-storage-nodefs";

// Stdout carries only answers; the libraries log with console.log.
console.log = console.error;

// Node filesystem storage that knows which of its writes are still running.
// `repo.flush()` saves every document but does not wait for a throttled save
// that started before it (measured: a write still running after about half
// the flushes that follow a burst of changes). The adapter writes files in
// place, so a kill during such a write leaves a truncated chunk, and
// Automerge's incremental load drops it and every chunk after it.
class SettlingStorage {
  #inner;
  #running = new Set();

  constructor(dir) {
    this.#inner = new NodeFSStorageAdapter(dir);
  }

  #track(promise) {
    this.#running.add(promise);
    const done = () => this.#running.delete(promise);
    promise.then(done, done);
    return promise;
  }

  load(key) {
    return this.#inner.load(key);
  }
  loadRange(prefix) {
    return this.#inner.loadRange(prefix);
  }
  save(key, data) {
    return this.#track(this.#inner.save(key, data));
  }
  remove(key) {
    return this.#track(this.#inner.remove(key));
  }
  removeRange(prefix) {
    return this.#track(this.#inner.removeRange(prefix));
  }

  // Resolves once no write is running. A write that finishes may start the
  // next one (a snapshot's save, then removing the chunks it replaces), so
  // the check is repeated after the continuations have run.
  async settled() {
    while (this.#running.size > 0) {
      await Promise.allSettled([...this.#running]);
      await new Promise((resolve) => setImmediate(resolve));
    }
  }
}

const [url, storageDir] = process.argv.slice(2);
const storage = storageDir ? new SettlingStorage(storageDir) : undefined;
const repo = new Repo({
  network: [new WebSocketClientAdapter(url)],
  storage,
});

const handles = new Map();
const received = new Map();

function answer(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

function plain(value) {
  if (A.isImmutableString(value)) return value.toString();
  if (value instanceof Uint8Array) return Array.from(value);
  if (value instanceof Date) return value.getTime();
  if (value instanceof A.Counter) return value.value;
  if (Array.isArray(value)) return value.map(plain);
  if (value && typeof value === "object") {
    const out = {};
    for (const [k, v] of Object.entries(value)) out[k] = plain(v);
    return out;
  }
  return value;
}

function track(handle) {
  handles.set(handle.documentId, handle);
  if (!received.has(handle.documentId)) {
    received.set(handle.documentId, []);
    handle.on("ephemeral-message", ({ message, senderId }) => {
      received.get(handle.documentId).push({ senderId, message });
    });
  }
  return handle;
}

async function handleOf(id) {
  return handles.get(id) ?? track(await repo.find(`automerge:${id}`));
}

function stateOf(handle) {
  if (!handle.isReady()) return { heads: [], value: null, state: handle.state };
  const doc = handle.doc();
  return { heads: A.getHeads(doc), value: plain(doc) };
}

function makeDoc() {
  let doc = A.from(
    {
      text: "hello",
      int: 42,
      float: 2.5,
      yes: true,
      nothing: null,
      bytes: new Uint8Array([0, 1, 255]),
      when: new Date(1764892800000),
      counter: new A.Counter(10),
      list: [1, "two", { three: 3 }],
      nested: { deeper: { deepest: "x" } },
    },
    { actor: "aa".repeat(16) },
  );
  doc = A.change(doc, (d) => {
    A.splice(d, ["text"], 5, 0, " world");
    d.counter.increment(5);
    d.list.push(4);
    delete d.nothing;
  });
  // A concurrent branch by another actor, merged.
  let other = A.clone(doc, { actor: "bb".repeat(16) });
  other = A.change(other, (d) => {
    d.from_b = "b";
    d.list.insertAt(0, 0);
  });
  doc = A.change(doc, (d) => {
    d.from_a = "a";
  });
  doc = A.merge(doc, other);
  const changes = A.getAllChanges(doc);
  const total = changes.reduce((n, c) => n + c.length, 0);
  const all = new Uint8Array(total);
  let at = 0;
  for (const c of changes) {
    all.set(c, at);
    at += c.length;
  }
  return {
    changes: Buffer.from(all).toString("base64"),
    heads: A.getHeads(doc),
    value: plain(doc),
  };
}

async function run(cmd) {
  switch (cmd.cmd) {
    case "create": {
      const handle = track(repo.create(cmd.value));
      return { id: handle.documentId, heads: A.getHeads(handle.doc()) };
    }
    case "find": {
      const started = performance.now();
      try {
        const handle = track(await repo.find(`automerge:${cmd.id}`));
        return { ...stateOf(handle), ms: performance.now() - started };
      } catch (e) {
        if (/unavailable/i.test(String(e))) {
          // The handle stays in the repo: if the document arrives later,
          // it turns ready ("wait" sees it).
          const handle = repo.handles[cmd.id];
          if (handle) track(handle);
          return { unavailable: true, ms: performance.now() - started };
        }
        throw e;
      }
    }
    case "change": {
      const handle = await handleOf(cmd.id);
      handle.change((d) => Object.assign(d, cmd.set));
      return { heads: A.getHeads(handle.doc()) };
    }
    case "state":
      return stateOf(await handleOf(cmd.id));
    case "wait": {
      const handle = await handleOf(cmd.id);
      const want = [...cmd.heads].sort().join(",");
      const deadline = performance.now() + (cmd.timeout_ms ?? 10000);
      while (performance.now() < deadline) {
        if (handle.isReady() && [...A.getHeads(handle.doc())].sort().join(",") === want) {
          return { ...stateOf(handle), ok: true };
        }
        await new Promise((r) => setTimeout(r, 10));
      }
      return { ...stateOf(handle), ok: false };
    }
    case "broadcast":
      (await handleOf(cmd.id)).broadcast(cmd.message);
      return {};
    case "messages":
      return { messages: received.get(cmd.id) ?? [] };
    case "make_doc":
      return makeDoc();
    case "load": {
      const doc = A.loadIncremental(A.init(), Buffer.from(cmd.changes, "base64"));
      return { heads: A.getHeads(doc), value: plain(doc) };
    }
    case "flush":
      await repo.flush();
      await storage?.settled();
      return {};
    case "quit":
      await repo.shutdown();
      process.exit(0);
    default:
      throw new Error(`unknown command ${cmd.cmd}`);
  }
}

// Commands run one at a time, in order.
const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  try {
    answer(await run(JSON.parse(line)));
  } catch (e) {
    answer({ error: String(e?.stack ?? e) });
  }
}
process.exit(0);
