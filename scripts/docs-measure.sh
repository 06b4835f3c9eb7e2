#!/usr/bin/env bash
# Re-measures every table and figure that the README shows (and docs/results.md around them),
# each in one run of the current engine, and redraws the figures. Results land in docs/data/
# (CSV/JSON/MD, each row with its commit and date) and docs/figures/ (each figure names the
# commits and dates of its rows). The prose in README.md and docs/results.md quotes these files;
# update it from them after a run.
#
# usage: scripts/docs-measure.sh [quality] [speed] [figures]   (default: all three, in order)
#   quality  ppl at 512 (32 windows) and 2048 (8 windows) for the six presets, and the K4V4/K4V2
#            variants (per-channel keys, residual, rotation) at 512: about 45 minutes on 2 cores
#   speed    bench over depth to 16K, the memory-budget table, bench attention, and
#            scripts/cpu-side-by-side.sh against llama.cpp and mlx-lm: run it on an idle machine
#   figures  kvsplit-mlx plot over the files above
# Run it from a committed tree: rows record the commit the binary was built from, with -dirty when
# the engine's sources differed from it. Every command writes into a scratch folder outside the
# tree, and a stage copies its files into docs/ only when all its commands are done.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DOCS_DATA="$ROOT/docs/data"
DATA=$(mktemp -d /tmp/docs-measure.XXXXXX)
BIN="$ROOT/target/release/kvsplit-mlx"
MODEL_STEM=SmolLM2-135M-Instruct.Q4_1
say() { printf '[docs-measure] %s\n' "$*" >&2; }
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(quality speed figures)
for s in "${stages[@]}"; do
  case "$s" in quality|speed|figures) ;; *) echo "docs-measure: unknown stage '$s' (quality, speed, figures)" >&2; exit 2 ;; esac
done
"$ROOT/scripts/setup.sh"
cargo build --release -q -p kvsplit-mlx
[ -z "$(git status --porcelain --untracked-files=no -- crates Cargo.toml Cargo.lock)" ] ||
  say "WARNING: the engine's sources differ from HEAD; rows will say -dirty"
say "scratch folder: $DATA"

quality() {
  say "ppl at 512 tokens, 32 windows"
  # --kv-plain: the README's table is of the plain presets (the recipes' frontier is
  # scripts/quality-frontier.sh's).
  "$BIN" ppl wikitext --kv fp16,k8v8,k8v4,k4v8,k4v4,k4v2 --kv-plain --ctx 512 --chunk 128 --max-windows 32 --out "$DATA"
  say "ppl at 2048 tokens, 8 windows"
  "$BIN" ppl wikitext --kv fp16,k8v8,k8v4,k4v8,k4v4,k4v2 --kv-plain --ctx 2048 --chunk 256 --max-windows 8 --out "$DATA"
  local v; v=$(mktemp -d)
  for flags in "--kv-key-layout per-channel" "--kv-residual 128" "--kv-rotate k" "--kv-rotate kv" "--kv-key-layout per-channel --kv-residual 128"; do
    say "ppl variants at 512: $flags"
    # shellcheck disable=SC2086
    "$BIN" ppl wikitext --kv 4,4 --kv 4,2 $flags --ctx 512 --chunk 128 --max-windows 32 --out "$v"
  done
  cp "$v/ppl-$MODEL_STEM-512.csv" "$DATA/ppl-variants-512.csv"
  cp "$v/ppl-$MODEL_STEM-512.json" "$DATA/ppl-variants-512.json"
  rm -rf "$v"
  # Whole files replace the old ones: every row of a file comes from this run.
  cp "$DATA"/ppl-*.csv "$DATA"/ppl-*.json "$DOCS_DATA/"
}

speed() {
  say "load average before the speed runs: $(cat /proc/loadavg)"
  # --kv-plain: the README's depth figure is of the plain presets (presets mean recipes since
  # the recipes shipped; their speed is compared in docs/quality.md "Speed").
  "$BIN" bench --kv fp16,k8v8,k8v4,k4v4 --kv-plain -d 0,1024,4096,16384 --fill random -p 512 -n 32 -r 2 --out "$DATA" --name bench-model-cpu
  # The budget table is closed form; the short run after it only satisfies bench.
  "$BIN" bench --memory-budget 1G --kv fp16,k8v8,k8v4,k4v8,k4v4,k4v2 -d 0 -p 16 -n 1 -r 1 --out "$(mktemp -d)" | tee "$DATA/memory-budget-1G.txt"
  "$BIN" bench attention --preset smollm2 --ctx 1024,4096,16384 -r 3 --out "$DATA" --name bench-attention-cpu
  "$BIN" bench attention --ctx 1024 -r 3 --out "$DATA" --name bench-attention-cpu-llama3
  "$ROOT/scripts/cpu-side-by-side.sh" --repeats 2 --out "$DATA/side-by-side"
  cp "$DATA"/bench-model-cpu.* "$DATA"/memory-budget-1G.txt "$DATA"/bench-attention-cpu* "$DOCS_DATA/"
  cp "$DATA"/side-by-side/data/* "$DOCS_DATA/"
  cp "$DATA"/side-by-side/cpu-side-by-side.md "$ROOT/docs/cpu-side-by-side.md"
}

figures() {
  "$BIN" plot "$DOCS_DATA/bench-model-cpu.csv" "$DOCS_DATA/bench-attention-cpu.csv" "$DOCS_DATA/ppl-$MODEL_STEM-512.csv" --out "$ROOT/docs/figures"
}

for s in "${stages[@]}"; do
  say "stage $s at $(git rev-parse --short=12 HEAD), $(date -u +%FT%TZ)"
  "$s"
done
