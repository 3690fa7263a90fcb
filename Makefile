# Entry points. The local real-service stack (ClickHouse, Redis, the tansu Kafka broker on
# loopback, state in .stack/) is managed by scripts/stack.sh; see its header.

# Ports follow the same TALLY_*_PORT overrides as scripts/stack.sh.
export TALLY_KAFKA_BROKERS ?= 127.0.0.1:$(or $(TALLY_KAFKA_PORT),19092)
export TALLY_CLICKHOUSE_URL ?= http://127.0.0.1:$(or $(TALLY_CH_HTTP_PORT),18123)
export TALLY_REDIS_URL ?= redis://127.0.0.1:$(or $(TALLY_REDIS_PORT),16379)
export TALLY_TANSU_BIN ?= $(or $(TALLY_CACHE),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/tally)/tansu-0.6.0/bin/tansu
export CARGO_TARGET_DIR ?= $(CURDIR)/target

STACK := bash scripts/stack.sh

.PHONY: test demo bench up down services-status stack-up stack-down stack-status stack-wipe

RELEASE_BINS := -p tally-ingest -p tally-aggregator -p tally-quota -p tally-rater -p tally-bench

# Every test, against the real local stack (started here if it is not running).
test: stack-up
	py="$$(bash scripts/pyenv.sh)" && TALLY_PYTHON="$$py" cargo test --workspace --all-targets

# The whole pipeline on the local stack with a demo load, printing what it did.
demo: up
	$(CARGO_TARGET_DIR)/release/tally-demo

# The load benches, figures as ratios against baselines from the same run (BENCHMARKS.md):
# the collector (tally-load), then the aggregator, freshness and usage queries (tally-aggbench),
# then the quota check on Redis (tally-quotabench; tally-bench builds it with the others).
bench: stack-up
	cargo build --release -p tally-ingest -p tally-aggregator -p tally-bench
	$(CARGO_TARGET_DIR)/release/tally-load
	$(CARGO_TARGET_DIR)/release/tally-aggbench
	$(CARGO_TARGET_DIR)/release/tally-quotabench

# The stack plus every tally service built so far, in the background.
up: stack-up
	cargo build --release $(RELEASE_BINS)
	bash scripts/services.sh up

down:
	bash scripts/services.sh down
	$(STACK) down

services-status:
	bash scripts/services.sh status

# install is a no-op when everything is present (no apt-get update, no build).
stack-up:
	$(STACK) install
	$(STACK) up

stack-down:
	$(STACK) down

stack-status:
	$(STACK) status

stack-wipe:
	$(STACK) wipe
