#!/usr/bin/env bash
# Builds the `causeway` binary of the previous release once and keeps it in
# target/previous-release/<release>/causeway, for the rolling-upgrade test
# (tests/upgrade.rs), which runs it beside the current build.
#
# The release is named by its commit (in every clone of main, tagged or
# not) as well as its tag; see docs/releases.md. Its sources come out of git
# with `git archive`, and it is built into this checkout's own target
# directory, so it reuses every dependency already built there (RocksDB
# included) and only its own crates are compiled. That build replaces
# target/debug/causeway; `make test` builds the current one again right
# after (cargo links it back without compiling anything).
set -euo pipefail
cd "$(dirname "$0")/.."

RELEASE=v0.1.0
COMMIT=2488a62d4c0cbd7dc802514714993c0f8450571c

out="target/previous-release/$RELEASE"
if [[ -x "$out/causeway" && "$(cat "$out/commit" 2>/dev/null)" == "$COMMIT" ]]; then
    exit 0
fi
if ! git cat-file -e "$COMMIT^{commit}" 2>/dev/null; then
    echo "previous-release: commit $COMMIT ($RELEASE) is not in this clone;" \
        "a shallow clone needs: git fetch --unshallow" >&2
    exit 1
fi
root=$(pwd)
src="$out/src"
rm -rf "$src"
mkdir -p "$src"
git archive "$COMMIT" | tar -x -C "$src"
echo "previous-release: building $RELEASE ($COMMIT)" >&2
(cd "$src" && CARGO_TARGET_DIR="$root/target" cargo build --locked -p causeway-cli)
cp target/debug/causeway "$out/causeway"
echo "$COMMIT" > "$out/commit"
rm -rf "$src"
"$out/causeway" --version >&2
