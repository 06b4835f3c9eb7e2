#!/usr/bin/env bash
# The whole test suite from a fresh clone: setup (cached), test data, then every test of the
# workspace in release mode (MLX-heavy tests are slow unoptimised).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
if [ -x "$ROOT/scripts/fetch-test-data.sh" ]; then "$ROOT/scripts/fetch-test-data.sh"; fi
cd "$ROOT"
cargo test --release --workspace
