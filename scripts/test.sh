#!/usr/bin/env bash
# The whole test suite from a fresh clone: setup (cached), test data, then every test of the
# workspace in release mode (MLX-heavy tests are slow unoptimised).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
"$ROOT/scripts/fetch-test-data.sh"
# Extra real models (Gemma 3, Qwen2.5) for family tests, once fetch-models.sh exists.
if [ -x "$ROOT/scripts/fetch-models.sh" ]; then "$ROOT/scripts/fetch-models.sh"; fi
cd "$ROOT"
cargo test --release --workspace
