"""vla-inference benchmark suite (`make bench` / `python -m bench.run`; GPU: `bench/gpu.sh`).

Everything here only ever talks to 127.0.0.1 and every load generator is bounded in clients,
requests and time. See docs/benchmarks.md for what each figure means.
"""
