// Drives Chromium against node A's /ui while the test cuts one region off
// and heals it, asserting what a person looking at the page would see:
// the cut region's lag growing while it is cut and falling after the heal,
// its nodes shown blocked, recent writes not held there and then held.
// Prints one JSON line of figures; screenshots go to cfg.out.
// Usage: node dashboard.mjs '{"url", "reader", "admin", "nodes": [{"url",
//   "peer_id", "region"}], "cut", "out", "chromium"}'
import { chromium } from "playwright-core";

const cfg = JSON.parse(process.argv[2]);
const fail = (msg) => { console.error("dashboard test: " + msg); process.exit(1); };
const browser = await chromium.launch({
  executablePath: cfg.chromium,
  headless: true,
  // Root in a container has no user namespace for Chromium's sandbox.
  args: ["--no-sandbox"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 1000 } });
  const pageErrors = [];
  page.on("pageerror", (e) => pageErrors.push(String(e)));
  const shots = [];
  const shot = async (name) => {
    const path = `${cfg.out}/${name}.png`;
    await page.screenshot({ path, fullPage: true });
    shots.push(path);
  };

  await page.goto(`${cfg.url}/ui?token=${cfg.reader}`);
  if (page.url().includes("token=")) fail("the token stayed in the address bar: " + page.url());
  const row = `#regions tr[data-region="${cfg.cut}"]`;
  const lagShown = (sel) => parseFloat(document.querySelector(sel + " td.lag")?.textContent ?? "NaN");
  const lagOf = () => page.evaluate(lagShown, row);
  const until = (fn, arg, timeout) => page.waitForFunction(fn, arg, { timeout, polling: 250 });
  const heldShows = ([region, mark]) => [...document.querySelectorAll("#writes td.held")]
    .some((td) => td.textContent.includes(region + " " + mark));

  // Healthy: every region's nodes replicate, recent writes are held in the
  // region that will be cut.
  await until((sel) => document.querySelector(sel + " td.nodes")?.textContent.includes("replicating"), row, 30000);
  await until(heldShows, [cfg.cut, "✓"], 30000);
  const before = await lagOf();
  await shot("1-healthy");

  // Cut the region off: every node of it blocks the others and is blocked
  // by them.
  const block = async (on, peer, method) => {
    const r = await fetch(`${on.url}/v1/blocked/${peer.peer_id}`, {
      method, headers: { Authorization: `Bearer ${cfg.admin}` },
    });
    if (!r.ok) fail(`${method} blocked/${peer.peer_id} on ${on.url}: ${r.status}`);
  };
  const cut = cfg.nodes.filter((n) => n.region === cfg.cut);
  const rest = cfg.nodes.filter((n) => n.region !== cfg.cut);
  const partition = async (method) => {
    for (const a of rest) for (const c of cut) { await block(a, c, method); await block(c, a, method); }
  };
  await partition("PUT");
  const cutAt = Date.now();
  await until((sel) => document.querySelector(sel + " td.nodes")?.textContent.includes("blocked"), row, 30000);
  await until(([sel, min]) => parseFloat(document.querySelector(sel + " td.lag")?.textContent) >= min, [row, 3], 60000);
  // Growing: a second later (or so: the page polls every second) it shows
  // more.
  const lagAt = await lagOf();
  await until(([sel, min]) => parseFloat(document.querySelector(sel + " td.lag")?.textContent) >= min, [row, lagAt + 1], 15000);
  const lagLater = await lagOf();
  // The other regions stand out as keeping up (the page lists regions
  // other than its node's own).
  const own = cfg.nodes.find((n) => n.url === cfg.url).region;
  for (const other of new Set(rest.map((n) => n.region).filter((r) => r !== own))) {
    const lag = await page.evaluate(lagShown, `#regions tr[data-region="${other}"]`);
    if (!(lag < lagLater)) fail(`region ${other}, not cut, shows ${lag} s of lag, the cut one ${lagLater} s`);
  }
  await until(heldShows, [cfg.cut, "✗"], 30000);
  await shot("2-partitioned");

  // Heal: the lag falls back.
  const peak = await lagOf();
  await partition("DELETE");
  const healAt = Date.now();
  await until(([sel, max]) => parseFloat(document.querySelector(sel + " td.lag")?.textContent) < max, [row, 1], 90000);
  const fell = (Date.now() - healAt) / 1000;
  await until((sel) => document.querySelector(sel + " td.nodes")?.textContent.includes("replicating"), row, 30000);
  await until(heldShows, [cfg.cut, "✓"], 30000);
  await shot("3-healed");
  if (pageErrors.length) fail("the page threw: " + pageErrors.join("; "));
  console.log(JSON.stringify({
    lag_before_s: before,
    lag_when_seen_growing_s: [lagAt, lagLater],
    lag_at_heal_s: peak,
    cut_for_s: (healAt - cutAt) / 1000,
    lag_below_1s_after_heal_s: fell,
    screenshots: shots,
  }));
} finally {
  await browser.close();
}
