#!/usr/bin/env bash
# The GPU check (see benchmarks/gpu_check.py): 2-rank NCCL vs 1 rank, the one-GPU refusal, gpu and
# gpu-int8 bundles through the CUDA and TensorRT providers, feature extraction on CUDA vs CPU.
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]   (needs onnxruntime-gpu installed beside onnxruntime)
# Planned to take under five minutes on one H200-class GPU; the JSON is kept after every step.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
exec timeout 600 "$PYTHON" benchmarks/gpu_check.py "${1:-${OUT:-gpu-check}}"
