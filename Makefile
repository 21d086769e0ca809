# One set of commands for developers, CI and users. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: help install up up-cluster up-secure down status topics demo test test-unit test-integration test-secure test-cluster test-wheel fuzz bench bench-cluster bench-old-engine lint clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-17s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml infra/packaging/dev.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c infra/packaging/dev.lock -e '.[dev]'
	touch $@

install: $(STAMP) ## create .venv and install the project with its dev tools

up: install ## provision (once) and start Kafka, PostgreSQL, immudb, anvil and the schema registry on 127.0.0.1
	$(BIN)/sardis-ledger dev up

up-cluster: install ## like up, with a 3-node Kafka cluster (127.0.0.1:19192,19194,19196) instead of the single node
	$(BIN)/sardis-ledger dev up --brokers 3

up-secure: install ## the secured stack beside the plain one: TLS, SCRAM, ACLs, DB roles (README: Deploying securely)
	$(BIN)/sardis-ledger dev up --secure

down: install ## stop the dev servers the harness started
	$(BIN)/sardis-ledger dev down

status: install ## show the dev servers and their health
	$(BIN)/sardis-ledger dev status

demo: install ## the whole story under `sardis-ledger run`, every step checked (~40 s warm)
	$(BIN)/sardis-ledger demo

test: install ## the whole suite: unit tests, then integration tests against the real servers
	$(BIN)/python -m pytest tests

test-unit: install ## unit tests only (no servers)
	$(BIN)/python -m pytest tests/unit

test-integration: install ## integration tests only (starts the servers it needs)
	$(BIN)/python -m pytest tests/integration

test-secure: install ## only the secured-stack tests (part of make test too; starts the secured stack)
	$(BIN)/python -m pytest tests/integration/test_secure_stack.py

test-cluster: install ## every 3-broker failure test (a broker, the commands leader, the controller, workers killed; CI runs the first and the last)
	SARDIS_TEST_CLUSTER_SCENARIOS=all $(BIN)/python -m pytest tests/integration/test_cluster.py

test-wheel: install ## build the wheel (imports moved in a temp copy), install it in fresh venvs per extra, check each command and the sizes
	$(BIN)/python -m infra.packaging.check_wheel $(ARGS)

fuzz: install ## the trust boundary at full size: 100,000 mutated records on the real worker, 100,000 pure-path examples
	SARDIS_TEST_FUZZ_RECORDS=100000 SARDIS_FUZZ_EXAMPLES=100000 $(BIN)/python -m pytest \
		tests/unit/test_input_fuzz.py tests/integration/test_trust_boundary.py -k "bug_path or mint"

bench: install ## end-to-end benchmarks (see README: Benchmarks)
	$(BIN)/sardis-ledger bench
	$(BIN)/python -m sardis_ledger.sinks.bench 50000 3 --shards 1 --shards 2 --lag-rate 2000 --lag-rate 10000

bench-old-engine: install ## closed loop vs the old engine (sardis-ledger 1.1.0, scratch venv); options: ARGS=--help
	$(BIN)/python -m infra.old_engine.compare $(ARGS)

bench-cluster: install ## the worker benchmark on the single broker and the 3-broker cluster, alternating in each run
	$(BIN)/sardis-ledger bench --brokers 1 --brokers 3 --runs 3 --commands 20000 --hot-commands 10000 --batches 1000 --accounts 1000

lint: install ## ruff and mypy
	$(BIN)/ruff check .
	$(BIN)/mypy -p sardis_ledger -p infra -p tests

clean: ## remove the virtual environment and caches (not the provisioned servers)
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
