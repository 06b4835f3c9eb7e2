#!/usr/bin/env bash
# On the lent GPU machine (after `scripts/gpu-run.sh`'s calls, the default model assembled):
# issue #18's speed target, the shipped k8v4 recipe against plain k8v4 in one process (rows
# alternate repeats, so drift of the machine hits both alike), at 4K and at a 128-token depth,
# then (unless --no-profile) ncu's per-kernel medians of both settings at 4K
# (scripts/gpu-step-profile.sh). Logs and ncu summaries go to $OUT (or ./gpu-recipe-speed); result
# files and ncu's raw CSV stay in /tmp (a device call returns only a few files).
# Usage: scripts/gpu-recipe-speed.sh [rounds] [--no-profile]
set -uo pipefail
out=${OUT:-gpu-recipe-speed}
rounds=${1:-2}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bin=${KVRT:?source /tmp/kvrt/gpu-env.sh first}/kvsplit-mlx
recipe=$here/../crates/models/recipes/SmolLM2-135M-Instruct.Q4_1-k8v4.json
mkdir -p "$out"
for r in $(seq "$rounds"); do
  for depth in 4096 128; do
    timeout 150 "$bin" bench --model default --kv k8v4 --kv-plain --kv-recipe "$recipe" -d "$depth" --fill random \
      -p 1 -n 64 -r 5 --out /tmp/gpu-recipe-speed 2>&1 | grep -E "decode split|^\| " | tee "$out/alternate-$depth-$r.log"
  done
done
[ "${2:-}" = --no-profile ] && exit 0
OUT=/tmp/gpu-recipe-speed/profile bash "$here/gpu-step-profile.sh" 4096 4 --model default --kv "k8v4 --kv-plain" --kv 8,4
cp /tmp/gpu-recipe-speed/profile/summary-*.md "$out/"
