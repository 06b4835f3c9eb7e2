#!/usr/bin/env bash
# The tiny mlx-lm checkpoints of the families whose layers leave the fused paths (Gemma 2's soft
# caps, gpt_oss's learned sinks and windows, the MoE families' gathered experts) through ppl and
# generate, so the same commands on the CPU (where the mlx-lm oracle test checks them) and on
# the lent GPU can be compared. Make the checkpoints here with
#   scripts/mlxlm-oracle.sh /tmp/orc TOKENIZER_DIR gemma2,qwen3_moe,mixtral,gpt_oss
# and copy each `<case>-q4` directory (without oracle.safetensors) to DIR/<case>.
# Usage: scripts/gpu-family-check.sh BIN DIR OUT   (BIN: the kvsplit-mlx binary)
set -uo pipefail
if [ $# -ne 3 ]; then
  echo "usage: scripts/gpu-family-check.sh BIN DIR OUT" >&2
  exit 2
fi
bin=$1 dir=$2 out=$3
mkdir -p "$out"
for m in "$dir"/*/; do
  name=$(basename "$m")
  echo "== $name"
  # Group 32: the oracle's smallest head_dim is 32.
  timeout 120 "$bin" ppl wikitext --model "$m" --kv fp16,k8v4 --kv-group-size 32 --ctx 64 --max-windows 4 \
    --out "$out/$name" 2>&1 | grep -E '^\|.*(fp16|k8v4)|rror'
  timeout 120 "$bin" generate --model "$m" --kv fp16 --max-tokens 16 --prompt "The capital of France is" 2>&1 \
    | grep -vE '^(Prompt|Generation|Peak|KV cache|Attention|=+$)' | tr '\n' ' '
  echo
done
