# vla-inference: every command a user or CI needs. `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Two layers in one .venv: what serving needs (`make run`), then the test and lint tools on top.
RUNTIME_STAMP := $(VENV)/.installed-runtime
STAMP := $(VENV)/.installed-dev
PROTO_DIR := src/vla_inference/api/v1
PROTO_SRC := $(PROTO_DIR)/vla_inference.proto
PROTO_OUT := $(PROTO_DIR)/vla_inference_pb2.py
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install install-runtime proto run test lint bench bench-replicas bench-gpu clean sim-install demos train-default eval eval-rtc ts-install ts-test

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {k++; name[k] = $$1; text[k] = $$2; \
		if (length($$1) > width) width = length($$1)} \
		END {for (i = 1; i <= k; i++) printf "  %s  %s\n", sprintf("%-" width "s", name[i]), text[i]}' $(MAKEFILE_LIST)

OPENPI_CLIENT := openpi-client==0.1.2

# The runtime: the server, the embedded default model, the Python client and the CLI (no extras).
# Building the package generates the gRPC code (setup.py; grpcio-tools is a build requirement only).
$(RUNTIME_STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e .
	@touch $(RUNTIME_STAMP)

install-runtime: $(RUNTIME_STAMP) ## Create .venv with what serving needs only: server, default model, client, CLI

# The dev extra on top: pytest, the transformers / diffusers references, linters; openpi-client.
$(STAMP): $(RUNTIME_STAMP)
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps $(OPENPI_CLIENT)
	@touch $(STAMP)

install: $(STAMP) ## install-runtime plus the test and lint tools (skipped when up to date)

# A changed .proto: rebuilding the editable package runs the generator again (setup.py).
$(PROTO_OUT): $(PROTO_SRC) | $(RUNTIME_STAMP)
	$(BIN)/pip install --quiet --no-deps -e .

proto: $(PROTO_OUT) ## Generate the gRPC code from the .proto file

run: install-runtime proto ## Serve the model chosen by VLA_* variables (default: the embedded MetaWorld policy) on :50051
	$(BIN)/vla-inference serve

SIM_STAMP := $(VENV)/.installed-sim
$(SIM_STAMP): pyproject.toml $(RUNTIME_STAMP)
	$(BIN)/pip install --quiet -e '.[sim]'
	@touch $(SIM_STAMP)

sim-install: $(SIM_STAMP) ## Install the simulated robot (MetaWorld, MuJoCo) into .venv (the server does not need it)

# The TypeScript client (clients/typescript): npm ci from the committed lockfile, redone only
# when the lockfile changes; its tests start the Python server from .venv.
TS_DIR := clients/typescript
TS_STAMP := $(TS_DIR)/node_modules/.installed

$(TS_STAMP): $(TS_DIR)/package-lock.json $(TS_DIR)/package.json
	cd $(TS_DIR) && npm ci --no-audit --no-fund
	@touch $(TS_STAMP)

ts-install: $(TS_STAMP) ## Install the TypeScript client's npm packages (npm ci; skipped when up to date)

ts-test: install proto $(TS_STAMP) ## Build the TypeScript client from the .proto and run its tests
	cd $(TS_DIR) && VLA_PYTHON=$(abspath $(BIN)/python) npm test

test: install proto $(SIM_STAMP) $(TS_STAMP) ## Run the whole test suite (Python, then the TypeScript client)
	MUJOCO_GL=egl $(BIN)/python -m pytest $(PYTEST_ARGS)
	cd $(TS_DIR) && VLA_PYTHON=$(abspath $(BIN)/python) npm test

lint: install proto ## ruff, mypy, and hadolint on the Dockerfile
	$(BIN)/ruff check src tests bench scripts setup.py
	$(BIN)/ruff format --check src tests bench scripts setup.py
	$(BIN)/mypy
	$(BIN)/hadolint --failure-threshold info Dockerfile

BENCH_STAMP := $(VENV)/.installed-bench
BENCH_ARGS ?=

$(BENCH_STAMP): pyproject.toml $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	@touch $(BENCH_STAMP)

bench: install proto $(BENCH_STAMP) ## Benchmarks on this machine (about 5 min); results in bench/results/
	$(BIN)/python -m bench.run $(BENCH_ARGS)

bench-replicas: install proto ## 16 robots against 1, 2, 3 replicas (client-side balancing; about 2 min)
	$(BIN)/python -m bench.replicas $(BENCH_ARGS)

clean: ## Remove the virtual environment, generated code and caches
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache runs ts-demo vla-inference-client-*.tgz
	rm -f $(PROTO_DIR)/*_pb2*.py $(PROTO_DIR)/*_pb2*.pyi
	rm -rf $(TS_DIR)/node_modules $(TS_DIR)/dist $(TS_DIR)/proto $(TS_DIR)/src/generated
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

DEMOS := data/metaworld-mt10
SMOOTH_DEMOS := data/metaworld-mt10-smooth
DEMO_EPISODES ?= 200

$(DEMOS)/manifest.json: | $(SIM_STAMP)
	MUJOCO_GL=egl $(BIN)/python -m vla_inference.sim.demos --out $(DEMOS) --episodes $(DEMO_EPISODES)

$(SMOOTH_DEMOS)/manifest.json: | $(SIM_STAMP)
	MUJOCO_GL=egl $(BIN)/python -m vla_inference.sim.demos --out $(SMOOTH_DEMOS) --episodes $(DEMO_EPISODES) --smooth

demos: $(DEMOS)/manifest.json $(SMOOTH_DEMOS)/manifest.json ## Record MetaWorld MT10 expert demonstrations into data/: as shipped, and rate-limited (about 35 min)

# Two stages: 7000 steps on the experts as they ship, then 2500 steps from that export on the smooth
# (rate-limited) experts' demonstrations, keeping stage 1's normalisation. Both resume where they stopped.
train-default: install proto sim-install demos ## Retrain the embedded default policy (about 70 + 16 min on 2 cores after the demos; resumable)
	$(BIN)/python -m vla_inference.training.train --data $(DEMOS) --run runs/metaworld \
		--export runs/metaworld/export
	$(BIN)/python -m vla_inference.training.train --data $(SMOOTH_DEMOS) --run runs/metaworld-smooth \
		--init runs/metaworld/export --steps 2500 --lr 3e-4 --warmup 100 \
		--export src/vla_inference/models/pi0/assets/metaworld

eval: install proto sim-install ## Closed-loop success of the default policy and its baselines (both experts, a wrong instruction) -> docs/evaluation.md (~20 min)
	MUJOCO_GL=egl $(BIN)/python -m vla_inference.sim.evaluate policy

eval-rtc: install proto sim-install ## Real-time chunking matrix in the simulated robot -> docs/evaluation.md (~40 min)
	MUJOCO_GL=egl $(BIN)/python -m vla_inference.sim.evaluate rtc --episodes 10

bench-gpu: install proto ## GPU benchmark (real sizes, bf16; under 8 min on one H100); `bench/gpu.sh --tiny` runs it on the CPU
	bench/gpu.sh $(BENCH_ARGS)
