#!/usr/bin/env bash
# The recipe/profile fuzzer with fresh random examples (CI runs a fixed, derandomized 200).
#   bash benchmarks/fuzz.sh [N]     N examples per property (default 2000)
set -euo pipefail
cd "$(dirname "$0")/.."
EDGETL_FUZZ="${1:-2000}" .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_recipe_fuzz.py
