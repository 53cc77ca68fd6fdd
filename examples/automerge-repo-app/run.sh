#!/usr/bin/env bash
# Starts a local three-region Causeway cluster (eu, us, ap on 127.0.0.1),
# runs app.mjs against it, and stops the cluster.
#   bash examples/automerge-repo-app/run.sh     (or: make example-automerge-repo)
# Ports: HTTP 7781-7783 and libp2p 7711-7713 (EXAMPLE_PORT_BASE=N shifts them).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
base="${EXAMPLE_PORT_BASE:-0}"
cargo build --quiet -p causeway-cli --manifest-path "$root/Cargo.toml"
bin="$root/target/debug/causeway"
(cd "$here" && npm install --no-audit --no-fund --loglevel=error >/dev/null)

dir="$(mktemp -d)"
pids=()
stop() {
    local status=$?
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [[ $status -eq 0 ]]; then
        rm -rf "$dir"
    else
        echo "the nodes' logs are in $dir" >&2
    fi
}
trap stop EXIT

regions=(eu us ap)
for i in 0 1 2; do
    region="${regions[$i]}"
    http=$((7781 + base + i))
    p2p=$((7711 + base + i))
    args=(node --data-dir "$dir/$region" --region "$region" --cluster example
          --listen "/ip4/127.0.0.1/tcp/$p2p" --http-listen "127.0.0.1:$http")
    for ((j = 0; j < i; j++)); do args+=(--bootstrap "/ip4/127.0.0.1/tcp/$((7711 + base + j))"); done
    "$bin" "${args[@]}" >"$dir/$region.out" 2>"$dir/$region.log" &
    pids+=($!)
done

# Wait (up to 30 s) until every node replicates with the two others.
node -e '
    const urls = process.argv.slice(1);
    const meshed = (url) => fetch(url).then((r) => r.json())
        .then((s) => s.node.peers.filter((p) => p.state === "replicating").length === 2)
        .catch(() => false);
    const deadline = Date.now() + 30000;
    (async () => {
        while (!(await Promise.all(urls.map(meshed))).every(Boolean)) {
            if (Date.now() > deadline) {
                console.error("the three nodes did not connect within 30 s");
                process.exit(1);
            }
            await new Promise((r) => setTimeout(r, 100));
        }
    })();' "http://127.0.0.1:$((7781 + base))/v1/status" \
    "http://127.0.0.1:$((7782 + base))/v1/status" "http://127.0.0.1:$((7783 + base))/v1/status"
echo "cluster up: eu http://127.0.0.1:$((7781 + base)), us :$((7782 + base)), ap :$((7783 + base))"

node "$here/app.mjs" \
    "ws://127.0.0.1:$((7781 + base))/automerge-repo" \
    "ws://127.0.0.1:$((7783 + base))/automerge-repo" \
    "http://127.0.0.1:$((7782 + base))"
