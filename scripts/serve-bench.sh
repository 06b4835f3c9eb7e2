#!/usr/bin/env bash
# The serve benchmark on this machine, one run: turn-2 time to first token of a ~4,000-token
# conversation with and without the prompt cache, and how many ~4K-token conversations a
# 256 MiB --prompt-cache-bytes keeps with fp16 and with k8v4. Writes docs/data/serve-bench.jsonl
# and prints it. Loopback only; each server stops at the end.
#
#   scripts/serve-bench.sh [TOKENS=4000] [CONVERSATIONS=8]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOKENS=${1:-4000} N=${2:-8}
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/kvsplit-mlx"
CACHE=${KVSPLIT_CACHE:-$HOME/.cache/kvsplit-mlx}
TEXT="$CACHE/data/wikitext-2-raw/wiki.test.raw"
[ -f "$TEXT" ] || "$BIN" ppl wikitext --max-windows 1 --ctx 64 >/dev/null
OUT="$ROOT/docs/data/serve-bench.jsonl"
TMP=$(mktemp -d)
PID=""
trap '[ -n "$PID" ] && kill -9 "$PID" 2>/dev/null; rm -rf "$TMP"' EXIT
start() {
  : >"$TMP/serve.log"
  "$BIN" serve --port 0 --max-tokens 32 --kv-budget 8G "$@" >"$TMP/serve.log" 2>&1 &
  PID=$!
  for _ in $(seq 1 300); do grep -q "^serving " "$TMP/serve.log" && break; sleep 0.2; done
  URL=$(grep -o "http://[0-9.:]*" "$TMP/serve.log" | head -1)
}
stop() { kill -TERM "$PID"; wait "$PID" || true; PID=""; }
meta() { echo "{\"commit\": \"$(git -C "$ROOT" rev-parse --short HEAD)\", \"date\": \"$(date -u +%FT%TZ)\", \"machine\": \"$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) / $(nproc) cores\", \"command\": \"scripts/serve-bench.sh $TOKENS $N\"}"; }
meta >>"$TMP/rows.jsonl"
for pc in 256M 0; do
  start --prompt-cache-bytes "$pc"
  python3 "$ROOT/scripts/serve_bench.py" ttft "$URL" "$TEXT" "$TOKENS" k8v4 | sed "s/^{/{\"prompt_cache_bytes\": \"$pc\", /" | tee -a "$TMP/rows.jsonl"
  stop
done
for kv in fp16 k8v4; do
  start --prompt-cache-bytes 256M
  python3 "$ROOT/scripts/serve_bench.py" kept "$URL" "$TEXT" "$TOKENS" "$N" "$kv" | tee -a "$TMP/rows.jsonl"
  stop
done
mv "$TMP/rows.jsonl" "$OUT"
echo "wrote $OUT"
