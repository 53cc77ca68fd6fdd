# Causeway: the commands a newcomer and CI use. See README.md.
CARGO ?= cargo
RELEASE_BIN := target/release/causeway

FUZZ_SECONDS ?= 60

.PHONY: demo example-automerge-repo test lint fmt fuzz chaos bench bench-all bench-ingest bench-durable-writes bench-reconcile bench-delta-path bench-scale bench-lag bench-join bench-backup bench-replicate-trace bench-many-docs-sync bench-steady-state bench-memory deps crash sim

## Install missing system packages (as root) and cargo-nextest.
deps:
	@bash scripts/deps.sh

## Run the multi-region demo: three nodes on loopback, a partition, a heal.
demo: deps
	$(CARGO) run -p causeway-cli -- demo

## A small Node.js app using automerge-repo against a local three-region
## cluster (examples/automerge-repo-app/).
example-automerge-repo: deps
	bash examples/automerge-repo-app/run.sh

## The full test suite: unit, property, simulator, crash test, real-process
## network and HTTP tests (they run the causeway binary), doc tests. The
## previous release's binary is built first, once (the upgrade test runs it).
test: deps
	bash scripts/previous_release.sh
	$(CARGO) build -p causeway-cli
	$(CARGO) nextest run --workspace --no-fail-fast
	$(CARGO) test --workspace --doc

## Formatting and clippy with warnings as errors.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

## Every fuzz target for FUZZ_SECONDS each (default 60); prints executions,
## corpus size and crashes per target. See fuzz/README.md.
fuzz: deps
	FUZZ_SECONDS=$(FUZZ_SECONDS) bash scripts/fuzz.sh

## Fault injection against real nodes in network namespaces (needs root):
## DURATION seconds of faults (default 600), then heal and check. Writes a
## JSON report to chaos-report.json and prints a table. SEED picks the
## schedule. BYZANTINE=1 adds a hostile member halfway through. See
## docs/testing.md.
DURATION ?= 600
SEED ?= 0
BYZANTINE ?= 0
chaos: deps
	$(CARGO) build --release -p causeway-cli
	$(RELEASE_BIN) chaos --seed $(SEED) --duration $(DURATION) --byzantine $(BYZANTINE) --report chaos-report.json > /dev/null

## Only the SIGKILL crash test, with its figures. CRASH_CYCLES=100 for a longer run.
crash: deps
	$(CARGO) nextest run -p causeway-tests --no-capture

## Benchmarks (release build); figures go to stdout (JSON) and stderr (table).
bench: bench-ingest bench-durable-writes bench-reconcile bench-delta-path bench-scale bench-lag bench-join bench-backup bench-replicate-trace bench-many-docs-sync bench-steady-state bench-memory

## Every scenario in one run (about 20 minutes); rewrites the summary table
## of docs/benchmarks.md. Installs the automerge-repo and samod peers.
bench-all: deps
	$(CARGO) build --release -p causeway-cli
	$(RELEASE_BIN) bench all --update docs/benchmarks.md > bench-all.jsonl

bench-ingest: deps
	$(CARGO) build --release -p causeway-cli
	$(RELEASE_BIN) bench ingest

bench-durable-writes: deps
	$(CARGO) build --release -p causeway-cli
	$(RELEASE_BIN) bench durable-writes

## Long simulator run (release build): SEEDS seeds from FIRST. Prints one JSON
## report per run and a summary; replay commands for any failure.
SEEDS ?= 10000
FIRST ?= 0
sim: deps
	$(CARGO) build --release -p causeway-cli
	$(RELEASE_BIN) sim --seed $(FIRST) --seeds $(SEEDS) > sim-report.jsonl
	@echo "per-run reports in sim-report.jsonl"

bench-reconcile: deps
	$(CARGO) build --release -p causeway-cli
	$(RELEASE_BIN) bench reconcile

bench-delta-path: deps
	$(CARGO) build --release -p causeway-cli
	$(RELEASE_BIN) bench delta-path

bench-scale: deps
	$(CARGO) build --release -p causeway-cli
	$(RELEASE_BIN) bench scale

bench-lag: deps
	$(CARGO) build --release -p causeway-cli
	$(RELEASE_BIN) bench lag

bench-join: deps
	$(CARGO) build --release -p causeway-cli
	$(RELEASE_BIN) bench join

bench-backup: deps
	$(CARGO) build --release -p causeway-cli
	$(RELEASE_BIN) bench backup

bench-replicate-trace: deps
	$(CARGO) build --release -p causeway-cli
	$(RELEASE_BIN) bench replicate-trace

bench-many-docs-sync: deps
	$(CARGO) build --release -p causeway-cli
	$(RELEASE_BIN) bench many-docs-sync

bench-steady-state: deps
	$(CARGO) build --release -p causeway-cli
	$(RELEASE_BIN) bench steady-state

bench-memory: deps
	$(CARGO) build --release -p causeway-cli
	$(RELEASE_BIN) bench memory
