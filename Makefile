# contextd: `make demo` runs a generated workload end to end; `make test` runs every test.
SHELL := /bin/bash
export CARGO_TARGET_DIR ?= $(HOME)/.cache/contextd/target
TANSU_ROOT ?= $(HOME)/.cache/contextd/tansu
export TANSU_BIN ?= $(TANSU_ROOT)/bin/tansu
BIN := $(CARGO_TARGET_DIR)/release/contextd

.PHONY: all build demo test deps tansu unit integration broker-tests browser-tests smoke lint fmt bench clean

all: build

deps:
	@bash scripts/deps.sh

build: deps
	cargo build --release --bins

demo: build
	$(BIN) demo

tansu:
	@bash scripts/tansu.sh

lint:
	cargo fmt --check
	cargo clippy --release --all-targets -- -D warnings

fmt:
	cargo fmt

# Every test: unit + property + embedded integration (real binary) + broker tests (real tansu)
# + browser tests (headless Chromium).
test: build tansu
	python3 -m pip install -q compose-spec==0.2.1 2>/dev/null || python3 -m pip install -q --break-system-packages compose-spec==0.2.1
	python3 scripts/check_compose.py
	cargo fmt --check
	cargo clippy --release --all-targets -- -D warnings
	cargo test --release -- --test-threads=2
	bash tests/browser/run.sh

# The full harness: the broker and the peer's Python packages first.
bench: build tansu
	python3 -c 'import confluent_kafka, quixstreams' 2>/dev/null || python3 -m pip install -q -r bench/peers/requirements.txt 2>/dev/null || python3 -m pip install -q --break-system-packages -r bench/peers/requirements.txt
	python3 bench/run.py

clean:
	cargo clean
