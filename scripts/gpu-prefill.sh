#!/usr/bin/env bash
# Whole-model prefill on the lent GPU (#19 items 4-5): prompts of 2K, 8K and 32K tokens into an
# empty cache of the random Llama-3.1-8B q4 model, fp16 against k8v4, ours (`bench`, chunks of
# 2048 tokens as mlx-lm runs them) and mlx-lm 0.32.2 (fp16 and its 8-bit cache, same libmlx), with
# peak memory for each. `--gpu-prefill off` rows (the block path before the widened route) run
# at the shorter lengths only: they take minutes at 32K.
#
# Runs on the GPU machine after scripts/gpu-run.sh's call B (`source /tmp/kvrt/gpu-env.sh`).
# Usage: scripts/gpu-prefill.sh OUTDIR [LENGTHS (default 2048,8192,32768)] [OFF_LENGTHS (default 2048,8192; "" for none)]
#          [VARIANT (bench flags, e.g. "--layer-eval on": extra ours rows at every length, named prefill-variant-P)]
#          [MLXLM_LENGTHS (default LENGTHS; "" skips mlx-lm)]
set -uo pipefail
[ $# -ge 1 ] || { echo "usage: $0 OUTDIR [LENGTHS] [OFF_LENGTHS]" >&2; exit 2; }
out=$1
lens=${2:-2048,8192,32768}
off=${3-2048,8192}
variant=${4:-}
mlxlm=${5-$lens}
[ -n "${KVRT:-}" ] || { echo "gpu-prefill: KVRT is not set: source gpu-env.sh first" >&2; exit 2; }
[[ $lens =~ ^[0-9]+(,[0-9]+)*$ ]] || { echo "gpu-prefill: LENGTHS must be comma-separated token counts, got '$lens'" >&2; exit 2; }
[[ -z $off || $off =~ ^[0-9]+(,[0-9]+)*$ ]] || { echo "gpu-prefill: OFF_LENGTHS must be comma-separated token counts, got '$off'" >&2; exit 2; }
[[ -z $mlxlm || $mlxlm =~ ^[0-9]+(,[0-9]+)*$ ]] || { echo "gpu-prefill: MLXLM_LENGTHS must be comma-separated token counts, got '$mlxlm'" >&2; exit 2; }
[[ -z $variant || $variant =~ ^--[a-z-]+\ [a-z0-9,]+(\ --[a-z-]+\ [a-z0-9,]+)*$ ]] || { echo "gpu-prefill: VARIANT must be bench flags with values ('--layer-eval on'), got '$variant'" >&2; exit 2; }
mkdir -p "$out"
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bench() {
  "$KVRT/kvsplit-mlx" bench --random-model llama3.1-8b --random-weights q4 -d 0 -n 1 -r 2 \
    --prefill-step 2048 --out "$out" "$@"
}
for p in ${lens//,/ }; do
  echo "== ours, prompt $p" | tee -a "$out/prefill.log"
  bench --kv fp16,k8v4 -p "$p" --name "prefill-$p" 2>&1 | tee -a "$out/prefill.log"
  if [ -n "$variant" ]; then
    echo "== ours, prompt $p, $variant" | tee -a "$out/prefill.log"
    # shellcheck disable=SC2086 # the variant is a list of flags
    bench --kv fp16,k8v4 -p "$p" $variant --name "prefill-variant-$p" 2>&1 | tee -a "$out/prefill.log"
  fi
done
for p in ${off//,/ }; do
  echo "== ours, prompt $p, --gpu-prefill off" | tee -a "$out/prefill.log"
  bench --kv k8v4 -p "$p" --gpu-prefill off --name "prefill-off-$p" 2>&1 | tee -a "$out/prefill.log"
done
if [ -n "$mlxlm" ]; then
  echo "== mlx-lm" | tee -a "$out/prefill.log"
  python3 "$here/mlxlm-decode-bench.py" --prefill "$mlxlm" 2>&1 | tee "$out/mlxlm-prefill.log"
fi
