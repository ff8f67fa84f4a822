# vla-inference: every command a user or CI needs. `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTO_DIR := src/vla_inference/api/v1
PROTO_SRC := $(PROTO_DIR)/vla_inference.proto
PROTO_OUT := $(PROTO_DIR)/vla_inference_pb2.py
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install proto run test lint bench bench-gpu clean

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## Create .venv and install the server with test and lint tools (skipped when up to date)

$(PROTO_OUT): $(PROTO_SRC) $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Isrc --python_out=src --pyi_out=src --grpc_python_out=src $(PROTO_SRC)

proto: $(PROTO_OUT) ## Generate the gRPC code from the .proto file

run: install proto ## Serve the model chosen by VLA_* variables (default: embedded pi0 demo) on :50051
	$(BIN)/vla-inference serve

test: install proto ## Run the whole test suite
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install proto ## ruff and mypy
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

BENCH_STAMP := $(VENV)/.installed-bench
BENCH_ARGS ?=

$(BENCH_STAMP): pyproject.toml $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	@touch $(BENCH_STAMP)

bench: install proto $(BENCH_STAMP) ## Benchmarks on this machine (about 5 min); results in bench/results/
	$(BIN)/python -m bench.run $(BENCH_ARGS)

clean: ## Remove the virtual environment, generated code and caches
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
	rm -f $(PROTO_DIR)/*_pb2*.py $(PROTO_DIR)/*_pb2*.pyi
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

bench-gpu: install proto ## GPU benchmark script (real sizes, bf16); `bench/gpu.sh --tiny` runs it on the CPU
	bench/gpu.sh $(BENCH_ARGS)
