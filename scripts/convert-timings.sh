#!/usr/bin/env bash
# Convert time, output size and load time (MLX directory vs GGUF) for the registry models.
# Every model is converted REPEATS times (with --force) losslessly and with `-q` (4-bit, group
# 64); load times come from crates/models/examples/load_time.rs, alternating GGUF and
# directories in one process. Prints one JSON line per measurement.
#   usage: scripts/convert-timings.sh [REPEATS] [WORKDIR]     (defaults: 5, /tmp/kvsplit-convert-timings)
# Needs the release binary and example in $CARGO_TARGET_DIR (default target/):
#   cargo build --release -p kvsplit-mlx && cargo build --release -p models --example load_time
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REPEATS="${1:-5}"
WORK="${2:-/tmp/kvsplit-convert-timings}"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}/release"
MODELS="${KVSPLIT_CACHE:-$HOME/.cache/kvsplit-mlx}/models"
mkdir -p "$WORK"
median() { python3 -c 'import statistics,sys; print("%.3f" % statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }

echo "{\"machine\": \"$(uname -m) $(nproc) cores\", \"load_average\": \"$(cut -d' ' -f1-3 /proc/loadavg)\", \"repeats\": $REPEATS}"
for gguf in SmolLM2-135M-Instruct.Q4_1.gguf gemma-3-270m-q4_k_m.gguf qwen2.5-coder-0.5b-instruct-q4_k_m.gguf; do
  src="$MODELS/$gguf"
  [ -f "$src" ] || { echo "missing $src: run scripts/setup.sh and scripts/fetch-models.sh" >&2; exit 1; }
  dirs=()
  for variant in lossless q4g64; do
    out="$WORK/${gguf%.gguf}-$variant"
    flags=(--force)
    [ "$variant" = q4g64 ] && flags+=(-q --q-bits 4 --q-group-size 64)
    times=()
    for _ in $(seq "$REPEATS"); do
      t0=$(date +%s.%N)
      "$TARGET/kvsplit-mlx" convert --from "$src" --out "$out" "${flags[@]}" >/dev/null
      t1=$(date +%s.%N)
      times+=("$(python3 -c "print('%.3f' % ($t1 - $t0))")")
    done
    echo "{\"convert\": \"$gguf\", \"variant\": \"$variant\", \"median_s\": $(median "${times[@]}"), \"times_s\": [$(IFS=,; echo "${times[*]}")], \"gguf_bytes\": $(stat -c %s "$src"), \"out_bytes\": $(du -sb "$out" | cut -f1), \"load_average\": \"$(cut -d' ' -f1-3 /proc/loadavg)\"}"
    dirs+=("$out")
  done
  "$TARGET/examples/load_time" "$REPEATS" "$src" "${dirs[@]}"
done
