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
