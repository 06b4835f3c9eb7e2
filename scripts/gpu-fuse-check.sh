#!/usr/bin/env bash
# On the lent GPU machine, after `scripts/gpu-run.sh`'s calls (the default model assembled for
# `small`): joined projections (`--fuse-projections on`, one product for q/k/v and one for
# gate/up) against separate ones (`off`), one process each (the option applies at load), in the
# order on, off; run it twice for two rounds. Within each process the plain k8v4 cache and the
# model's k8v4 recipe (what `--kv 8,4` runs) alternate as bench's rounds, which also gives issue
# #18's recipe/plain ratio from one process.
#   small: the default model, -d 0,4096 (random fill), 1-token prompt, 128 decode steps, 6 rounds
#   8b:    a random Llama-3.1-8B shape with 4-bit weights, k8v4, -d 4096, 64 steps, 3 rounds
# Results (CSV/JSON/Markdown) go to $OUT/fuse-<what>-<on|off>-<round>; logs beside them.
# Usage: scripts/gpu-fuse-check.sh small|8b ROUND
set -uo pipefail
if [ $# -ne 2 ] || { [ "$1" != small ] && [ "$1" != 8b ]; }; then
  echo "usage: scripts/gpu-fuse-check.sh small|8b ROUND" >&2
  exit 2
fi
what=$1 round=$2
out=${OUT:-gpu-fuse-check}
bin=${KVRT:?source /tmp/kvrt/gpu-env.sh first}/kvsplit-mlx
# The shipped recipe `--kv 8,4` finds by model hash, named as a file: a sweep's --kv-plain
# applies to its whole --kv list, and the recipe joins it as one more entry.
recipe=crates/models/recipes/SmolLM2-135M-Instruct.Q4_1-k8v4.json
for f in on off; do
  dir="$out/fuse-$what-$f-$round"
  mkdir -p "$dir"
  if [ "$what" = small ]; then
    timeout 280 "$bin" bench --model default --kv k8v4 --kv-plain --kv-recipe "$recipe" -d 0,4096 --fill random -p 1 -n 128 -r 6 \
      --fuse-projections "$f" --out "$dir" --name bench > "$dir/log" 2>&1
  else
    timeout 280 "$bin" bench --random-model llama3.1-8b --random-weights q4 --kv k8v4 -d 4096 --fill random -p 1 -n 64 -r 3 \
      --fuse-projections "$f" --out "$dir" --name bench > "$dir/log" 2>&1
  fi
  echo "== $what fuse-projections=$f round $round (exit $?)"
  grep -E '^\|' "$dir/log" | cut -c1-200
done
