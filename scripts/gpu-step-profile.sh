#!/usr/bin/env bash
# On the lent GPU machine (after `scripts/gpu-run.sh`'s call B): where a decode step's device
# time goes, per kernel class, for the random Llama-3.1-8B shape with 4-bit weights (issue #19)
# or any model bench loads (`--model default` needs call C).
# ncu records only the last repeat's decode steps (`bench --cuda-profile-range`), one metric
# (kernel duration), clocks and caches left alone; ncu serialises kernels, so the sum of kernel
# times per step is the device's busy time, and the unprofiled `bench` line of the same setting
# gives the step's wall time: the difference is launch gaps and host time the device waits on.
# Logs and the summary go to $OUT (or ./gpu-step-profile).
# Usage: scripts/gpu-step-profile.sh [depth] [steps] [--model M] [--kv "SETTING [FLAGS]"]...
#   default settings: k8v4 and fp16; e.g. --model default --kv "k8v4 --kv-plain" --kv 8,4
#   compares the plain preset with the model's recipe.
set -uo pipefail
out=${OUT:-gpu-step-profile}
depth=4096
steps=4
model=(--random-model llama3.1-8b --random-weights q4)
kvs=()
pos=0
while [ $# -gt 0 ]; do
  case $1 in
    --model|--kv) [ $# -ge 2 ] || { echo "gpu-step-profile: $1 needs a value" >&2; exit 2; } ;;&
    --model) model=(--model "$2"); shift 2 ;;
    --kv) kvs+=("$2"); shift 2 ;;
    *) [[ $1 =~ ^[0-9]+$ ]] || { echo "gpu-step-profile: '$1' is not a depth or a step count" >&2; exit 2; }
       if [ $pos = 0 ]; then depth=$1; else steps=$1; fi; pos=$((pos + 1)); shift ;;
  esac
done
[ ${#kvs[@]} -gt 0 ] || kvs=(k8v4 fp16)
mkdir -p "$out"
bin=${KVRT:?source /tmp/kvrt/gpu-env.sh first}/kvsplit-mlx
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
common=(bench "${model[@]}" --fill random -d "$depth" -p 1)
for setting in "${kvs[@]}"; do
  read -ra kv <<< "$setting"
  tag=$(echo "$setting" | tr -cs 'a-zA-Z0-9,' '-' | tr ',' '_' | sed 's/-$//')
  # Unprofiled first: the step's wall time and its host/device split.
  timeout 200 "$bin" "${common[@]}" --kv "${kv[@]}" -n 64 -r 2 2>&1 | grep -E "decode split|^\| " | tee "$out/bench-$tag.log"
  timeout 240 "$ncu" --clock-control none --cache-control none --profile-from-start off \
    --metrics gpu__time_duration.sum --csv --page raw --print-units base \
    --log-file "$out/ncu-$tag.csv" "$bin" "${common[@]}" --kv "${kv[@]}" -n "$steps" -r 1 --cuda-profile-range \
    > "$out/ncu-run-$tag.log" 2>&1
  echo "ncu $setting: rc $?, $(wc -l < "$out/ncu-$tag.csv") lines"
  python3 "$here/ncu-summary.py" "$out/ncu-$tag.csv" --steps "$steps" | tee "$out/summary-$tag.md"
done
