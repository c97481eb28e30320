#!/usr/bin/env bash
# Fuzzers with fresh random examples (CI runs fixed, derandomized ones):
#   the recipe/profile fuzzer (tests/test_recipe_fuzz.py), N examples per property, and
#   the C++ consumer's image reader (tests/test_cpp_image.py: mutated PPM/PNG files through
#   image_io.hpp built with AddressSanitizer + UndefinedBehaviorSanitizer), M files, a fresh seed.
#   bash benchmarks/fuzz.sh [N] [M]     defaults: N 2000, M 30000
set -euo pipefail
cd "$(dirname "$0")/.."
EDGETL_FUZZ="${1:-2000}" .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_recipe_fuzz.py
seed=$(( (RANDOM << 15) | RANDOM ))
echo "C++ image reader fuzz: seed $seed (EDGETL_CPP_FUZZ_SEED=$seed reruns it)"
EDGETL_CPP_FUZZ="${2:-30000}" EDGETL_CPP_FUZZ_SEED="$seed" .venv/bin/python -m pytest -q -s -p no:cacheprovider \
  tests/test_cpp_image.py -k fuzz
