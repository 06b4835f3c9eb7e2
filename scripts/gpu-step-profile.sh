#!/usr/bin/env bash
# On the lent GPU machine (after `scripts/gpu-run.sh`'s call B): where a decode step's device
# time goes, per kernel class, for the random Llama-3.1-8B shape with 4-bit weights (issue #19).
# ncu records only the last repeat's decode steps (`bench --cuda-profile-range`), one metric
# (kernel duration), clocks and caches left alone; ncu serialises kernels, so the sum of kernel
# times per step is the device's busy time, and the unprofiled `bench` line of the same setting
# gives the step's wall time: the difference is launch gaps and host time the device waits on.
# Logs and the summary go to $OUT (or ./gpu-step-profile).
# Usage: scripts/gpu-step-profile.sh [depth] [steps]
set -uo pipefail
out=${OUT:-gpu-step-profile}
depth=${1:-4096}
steps=${2:-4}
mkdir -p "$out"
bin=${KVRT:?source /tmp/kvrt/gpu-env.sh first}/kvsplit-mlx
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
common=(bench --random-model llama3.1-8b --random-weights q4 --fill random -d "$depth" -p 1)
for kv in k8v4 fp16; do
  # Unprofiled first: the step's wall time and its host/device split.
  timeout 200 "$bin" "${common[@]}" --kv $kv -n 64 -r 2 2>&1 | grep -E "decode split|^\| " | tee "$out/bench-$kv.log"
  timeout 240 "$ncu" --clock-control none --cache-control none --profile-from-start off \
    --metrics gpu__time_duration.sum --csv --page raw --print-units base \
    --log-file "$out/ncu-$kv.csv" "$bin" "${common[@]}" --kv $kv -n "$steps" -r 1 --cuda-profile-range \
    > "$out/ncu-run-$kv.log" 2>&1
  echo "ncu $kv: rc $?, $(wc -l < "$out/ncu-$kv.csv") lines"
  python3 "$here/ncu-summary.py" "$out/ncu-$kv.csv" --steps "$steps" | tee "$out/summary-$kv.md"
done
