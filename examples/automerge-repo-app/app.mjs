// A shared shopping list in three regions, written with the stock
// automerge-repo libraries; the only Causeway-specific thing is the URL.
//
//   node app.mjs EU_WS_URL AP_WS_URL US_HTTP_URL
//
// A client in eu creates the list, a client in ap finds it and both edit
// it at once; ap's user announces presence (an ephemeral message) that eu
// sees; the node in us, which no client talks to, serves the same document
// over its HTTP API.

import { next as A } from "@automerge/automerge";
import { Repo } from "@automerge/automerge-repo";
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket";

const [euUrl, apUrl, usHttp] = process.argv.slice(2);
const log = (...args) => process.stdout.write(args.join(" ") + "\n");
const ms = (t) => `${(performance.now() - t).toFixed(0)} ms`;

const inEu = new Repo({ network: [new WebSocketClientAdapter(euUrl)] });
const inAp = new Repo({ network: [new WebSocketClientAdapter(apUrl)] });

const list = inEu.create({ title: "Groceries", items: [] });
log(`eu: created ${list.url}`);

let t = performance.now();
const there = await inAp.find(list.url);
log(`ap: found it after ${ms(t)}: ${JSON.stringify(there.doc())}`);

// Presence: ap's user says where they are; eu hears it through the cluster.
const heard = new Promise((resolve) =>
  list.on("ephemeral-message", ({ message }) => resolve(message)),
);
there.broadcast({ user: "ana", editing: "items" });
log(`eu: presence from ap: ${JSON.stringify(await heard)}`);

// Both regions edit at once.
list.change((d) => d.items.push("bread"));
there.change((d) => d.items.push("milk"));

t = performance.now();
const same = () =>
  A.getHeads(list.doc()).sort().join() === A.getHeads(there.doc()).sort().join() &&
  list.doc().items.length === 2;
while (!same()) await new Promise((r) => setTimeout(r, 10));
log(`eu and ap converged after ${ms(t)}: ${JSON.stringify(list.doc().items)}`);

// The third region holds it too, as an ordinary Causeway document.
const heads = A.getHeads(list.doc()).sort().join(",");
t = performance.now();
for (;;) {
  const r = await fetch(`${usHttp}/v1/docs/${list.documentId}`);
  if (r.ok && r.headers.get("causeway-heads").split(",").sort().join(",") === heads) {
    log(`us (HTTP API) after ${ms(t)}: ${JSON.stringify(await r.json())}`);
    break;
  }
  await new Promise((r) => setTimeout(r, 20));
}

await inEu.shutdown();
await inAp.shutdown();
process.exit(0);
