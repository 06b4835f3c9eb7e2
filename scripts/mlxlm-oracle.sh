#!/usr/bin/env bash
# mlx-lm's model classes as the oracle of ours (issue #21; crates/models/tests/mlxlm_oracle.rs
# runs this): a venv with mlx[cpu] and mlx-lm 0.32.2 from PyPI (a test tool, never a project
# dependency) under $KVSPLIT_CACHE/test-venvs/mlxlm, then scripts/mlxlm_oracle.py writes the tiny
# random checkpoints and mlx-lm's logits and greedy tokens for them into OUT.
# Usage: scripts/mlxlm-oracle.sh OUT TOKENIZER_DIR [CASES]
#   CASES: only these comma-separated case names (e.g. mixtral,qwen3_moe), for debugging
set -euo pipefail
if [ $# -lt 2 ] || [ $# -gt 3 ] || [ ! -f "$2/tokenizer.json" ]; then
  echo "usage: scripts/mlxlm-oracle.sh OUT TOKENIZER_DIR [CASES] (TOKENIZER_DIR must hold tokenizer.json)" >&2
  exit 2
fi
out=$1 tok=$2
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${KVSPLIT_CACHE:-$HOME/.cache/kvsplit-mlx}
VENV="$CACHE/test-venvs/mlxlm"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import mlx_lm, mlx.core" 2>/dev/null; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  timeout 600 "$VENV/bin/pip" install -q --disable-pip-version-check "mlx[cpu]==0.32.2" "mlx-lm==0.32.2"
fi
timeout 600 "$VENV/bin/python" "$here/mlxlm_oracle.py" "$out" "$tok" ${3:+"$3"}
