# The two commands of the contract: `make demo` and `make test` (see README).

TARGET_DIR := $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)
LAB := $(TARGET_DIR)/debug/jai-lab
LAB_DIR ?= /tmp/jai-demo
NODES ?= 3

.PHONY: setup build demo demo-down test lint unit

setup:
	@scripts/setup.sh

build: setup
	cargo build --workspace --locked

## Start a 3-node cluster (etcd x3, PostgreSQL + jai-agent x3, HAProxy) and say how to use it.
demo: build
	@if [ -f $(LAB_DIR)/lab.json ]; then $(LAB) down --dir $(LAB_DIR) >/dev/null; fi
	$(LAB) up --dir $(LAB_DIR) --nodes $(NODES)

demo-down:
	$(LAB) down --dir $(LAB_DIR)

lint: setup
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

## Everything: format, lints, unit tests, integration tests on real components.
test: lint
	cargo build --workspace --all-targets --locked
	cargo test --workspace --locked

## Benchmarks: numbers, not pass/fail (docs/benchmarks.md). RUNS runs each.
BENCH := $(TARGET_DIR)/debug/jai-bench
BENCH_DIR ?= /tmp/jai-bench
RUNS ?= 5
BENCH_FLAGS ?=

.PHONY: bench bench-failover bench-switchover bench-status

bench: bench-failover bench-switchover bench-status

## SIGKILL the primary RUNS times under a writer: write unavailability, time to a new leader, lost writes.
bench-failover: build
	@if [ -f $(BENCH_DIR)/lab.json ]; then $(LAB) down --dir $(BENCH_DIR) >/dev/null; fi
	$(BENCH) failover --runs $(RUNS) --dir $(BENCH_DIR) $(BENCH_FLAGS)

## `jaictl switchover` RUNS times under the same writer: write unavailability (gap), lost writes (must be 0).
bench-switchover: build
	@if [ -f $(BENCH_DIR)/lab.json ]; then $(LAB) down --dir $(BENCH_DIR) >/dev/null; fi
	$(BENCH) switchover --runs $(RUNS) --dir $(BENCH_DIR) $(BENCH_FLAGS)

## How fast `jaictl status` answers on a lab: STATUS_RUNS invocations of the real binary.
STATUS_RUNS ?= 50
bench-status: build
	@if [ -f $(BENCH_DIR)/lab.json ]; then $(LAB) down --dir $(BENCH_DIR) >/dev/null; fi
	$(BENCH) status --runs $(STATUS_RUNS) --dir $(BENCH_DIR) $(BENCH_FLAGS)

## Backups on a 2-node lab (docs/benchmarks.md, "Backups"): full and incremental
## backup times, repository size, restore drill time and RPO, on the lab's small
## database and after pgbench -i -s SCALE (70: ~1 GB). About 10 minutes, ~4 GB of disk.
BENCH_BACKUP_DIR ?= /tmp/jai-bench-backup
SCALE ?= 70
.PHONY: bench-backup
bench-backup: build
	BENCH_BACKUP_DIR=$(BENCH_BACKUP_DIR) SCALE=$(SCALE) BIN_DIR=$(TARGET_DIR)/debug scripts/bench-backup.sh

## Deterministic simulation of the agent's core and round driver: SEEDS histories (docs/architecture.md).
SEEDS ?= 10000
.PHONY: sim sim-bugs
sim:
	JAI_SIM_SEEDS=$(SEEDS) cargo test --release -p jai-agent --test simulation simulated_histories -- --nocapture

## Replays the seeds that show the known core bugs (fails while one remains).
sim-bugs:
	JAI_SIM_EXPOSE=1 cargo test --release -p jai-agent --test simulation known_core_bugs -- --ignored --nocapture

## The voting app through HAProxy (wrk) beside pgbench of the same vote SQL on the primary (release build).
BENCH_APP_DIR ?= /tmp/jai-bench-app
BENCH_APP_FLAGS ?=
.PHONY: bench-app
bench-app: setup
	cargo build --release --workspace --locked
	@if [ -f $(BENCH_APP_DIR)/lab.json ]; then $(TARGET_DIR)/release/jai-lab down --dir $(BENCH_APP_DIR) >/dev/null; fi
	$(TARGET_DIR)/release/jai-bench-app --dir $(BENCH_APP_DIR) $(BENCH_APP_FLAGS)

## Chaos on real components (docs/benchmarks.md, "Chaos"): a randomized, seeded
## schedule of faults for CHAOS_DURATION under the writer; summary table; exits
## non-zero on an invariant violation. CHAOS_SEED (or JAI_CHAOS_SEED) replays one.
CHAOS_DURATION ?= 15m
CHAOS_DIR ?= /tmp/jai-chaos
CHAOS_SEED ?=
CHAOS_FLAGS ?=

.PHONY: chaos
chaos: build
	@if [ -f $(CHAOS_DIR)/lab.json ]; then $(LAB) down --dir $(CHAOS_DIR) >/dev/null; fi
	$(BENCH) chaos --duration $(CHAOS_DURATION) --dir $(CHAOS_DIR) $(if $(CHAOS_SEED),--seed $(CHAOS_SEED)) $(CHAOS_FLAGS)

## A fresh Debian 12 root (debootstrap minbase, chroot) runs scripts/setup.sh, builds and runs the demo. Needs root; minutes; not part of `make test`.
.PHONY: fresh-check
fresh-check:
	scripts/fresh-check.sh
