#!/usr/bin/env bash
# The serve benchmark on this machine, one run: turn-2 time to first token of a ~4,000-token
# conversation with and without the prompt cache, and how many ~4K-token conversations a
# 256 MiB --prompt-cache-bytes keeps with fp16 and with k8v4. Writes docs/data/serve-bench.jsonl
# and prints it. Then the peers on the same ttft workload (scripts/serve-peers-bench.sh:
# mlx_lm.server, dense and 8-bit cache, and llama-cpp-python's server with q8_0 K / q4_0 V),
# whose rows go to the same file with an `engine` field. Loopback only; each server stops at the
# end. Time to first token and decode tok/s are measured by the client (scripts/serve_bench.py)
# the same way for every engine.
#
#   scripts/serve-bench.sh [TOKENS=4000] [CONVERSATIONS=8] [STAGES=ours,peers]
#
# STAGES: `ours` (our server: ttft with and without the prompt cache, conversations kept),
# `peers`, or both. Without `ours` the rows are appended to the file instead of replacing it.
# PEER_ENGINES (default mlxlm,mlxlm-kv8,llamacpp) picks the peers. The binary is $KVSPLIT_BIN,
# else $CARGO_TARGET_DIR (default target/)/release/kvsplit-mlx; SERVE_BENCH_OUT writes another
# file than docs/data/serve-bench.jsonl.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOKENS=${1:-4000} N=${2:-8} STAGES=${3:-ours,peers}
BIN="${KVSPLIT_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/kvsplit-mlx}"
case ",$STAGES," in *,ours,*|*,peers,*) ;; *) echo "serve-bench: STAGES must name ours and/or peers, got '$STAGES'" >&2; exit 2 ;; esac
CACHE=${KVSPLIT_CACHE:-$HOME/.cache/kvsplit-mlx}
TEXT="$CACHE/data/wikitext-2-raw/wiki.test.raw"
[ -f "$TEXT" ] || "$BIN" ppl wikitext --max-windows 1 --ctx 64 >/dev/null
OUT="${SERVE_BENCH_OUT:-$ROOT/docs/data/serve-bench.jsonl}"
TMP=$(mktemp -d)
PID=""
trap '[ -n "$PID" ] && kill -9 "$PID" 2>/dev/null; rm -rf "$TMP"' EXIT
. "$ROOT/scripts/server-lib.sh"
WHO=serve-bench
start() { serve_ours "$TMP/serve.log" "$BIN" --port 0 --max-tokens 32 --kv-budget 8G "$@" || exit 1; }
stop() { kill -TERM "$PID"; wait "$PID" || true; PID=""; }
GPU=""
# BENCH_COMMIT names the commit where the tree's git is absent or stale (the GPU machine's copy).
COMMIT=${BENCH_COMMIT:-$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)}
WARMUP=()
[ "${SERVE_BENCH_WARMUP:-0}" = 1 ] && WARMUP=(--warmup)
command -v nvidia-smi >/dev/null && GPU=" / $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
meta() { echo "{\"commit\": \"$COMMIT\", \"warmup\": \"${SERVE_BENCH_WARMUP:-0}\", \"date\": \"$(date -u +%FT%TZ)\", \"machine\": \"$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) / $(nproc) cores$GPU\", \"load_before\": \"$(cut -d' ' -f1-3 /proc/loadavg)\", \"command\": \"scripts/serve-bench.sh $TOKENS $N $STAGES\"}"; }
meta >>"$TMP/rows.jsonl"
if [[ ",$STAGES," == *,ours,* ]]; then
  ours="kvsplit-mlx $("$BIN" --version | cut -d' ' -f2) (commit $COMMIT)"
  for pc in 256M 0; do
    start --prompt-cache-bytes "$pc"
    python3 "$ROOT/scripts/serve_bench.py" ttft "$URL" "$TEXT" "$TOKENS" k8v4 "${WARMUP[@]}" \
      --tag "{\"engine\": \"$ours, KV k8v4\", \"peer\": null, \"prompt_cache_bytes\": \"$pc\"}" | tee -a "$TMP/rows.jsonl"
    stop
  done
  for kv in fp16 k8v4; do
    start --prompt-cache-bytes 256M
    python3 "$ROOT/scripts/serve_bench.py" kept "$URL" "$TEXT" "$TOKENS" "$N" "$kv" --tag "{\"engine\": \"$ours\"}" | tee -a "$TMP/rows.jsonl"
    stop
  done
fi
if [[ ",$STAGES," == *,peers,* ]]; then
  KVSPLIT_BIN="$BIN" "$ROOT/scripts/serve-peers-bench.sh" "$TOKENS" "$TMP/rows.jsonl" "${PEER_ENGINES:-mlxlm,mlxlm-kv8,llamacpp}"
fi
if [[ ",$STAGES," == *,ours,* ]]; then mv "$TMP/rows.jsonl" "$OUT"; else cat "$TMP/rows.jsonl" >>"$OUT"; fi
echo "wrote $OUT"
