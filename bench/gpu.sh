#!/usr/bin/env bash
# GPU benchmark: pi0 (1 and 3 cameras), pi0.5, OpenVLA 7B, OpenVLA-OFT 7B (LIBERO: 2 cameras,
# 8 x 7 actions per pass; reported per action beside OpenVLA), GR00T N1.5 and N1.7, SmolVLA (1 and 3
# cameras), pi0-FAST at real size with random weights built on the GPU (bf16; nothing downloaded,
# no checkpoint files): model latency p50/p99 at batch 1, throughput at batch 8, peak GPU memory,
# and end-to-end Predict through the server;
# eager and compiled (VLA_COMPILE's static-shape runners, CUDA graphs) side by side against the
# batch-1 goals (pi0 3 cameras / pi0.5 / GR00T <= 20 ms, OpenVLA 7B <= 60 ms).
#
#   bench/gpu.sh            on a GPU machine; finishes in under 8 minutes on one H100/H200
#   bench/gpu.sh --tiny     tiny configurations on the CPU (checks the script anywhere)
#   bench/gpu.sh --only smolvla     one family (name prefixes, comma-separated)
#   bench/gpu.sh --only pi0-FAST   one family (pi0-FAST: time to first token / first action, eager
#                                  and compiled, batch 1 and 8)
#
# Results: $OUT/gpu-bench.json when OUT is set, else bench/results/gpu-<UTC stamp>.json.
# Extra arguments go to `python -m bench.gpu` (see --help). PYTHON overrides the interpreter
# (default: .venv/bin/python when present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="src:.${PYTHONPATH:+:$PYTHONPATH}"
# Generated gRPC code is not committed; build it when grpc_tools is present (needed for end to end).
if [[ ! -f src/vla_inference/api/v1/vla_inference_pb2.py ]] && "$PYTHON" -c "import grpc_tools" 2>/dev/null; then
    "$PYTHON" -m grpc_tools.protoc -Isrc --python_out=src --pyi_out=src --grpc_python_out=src \
        src/vla_inference/api/v1/vla_inference.proto
fi
exec timeout --signal=INT --kill-after=20 "${BENCH_GPU_TIMEOUT_S:-470}" "$PYTHON" -m bench.gpu "$@"
