#!/usr/bin/env bash
# Soak test of `kvsplit-mlx serve` (issue: "several hundred requests with random cancellations
# and bad bodies mixed in; every request gets an answer or a clean error, and resident memory
# returns to its baseline afterwards"). Starts the server on a free loopback port with the
# default model, a small --max-tokens, a prompt-cache budget, a KV budget and a small --queue (so
# concurrent clients meet 503s), runs scripts/soak_test.py (standard library only: seeded
# requests from a few client threads, every answer checked, RSS and /metrics watched), then
# sends SIGTERM and checks the server exits 0. Bounded in count and time; stops by itself.
#
#   scripts/soak-test.sh [BIN] [REQUESTS] [SEED]   (default: target/release/kvsplit-mlx, 360, 1)
#   SOAK_LENIENT=1: the gaps the driver knows (405 and 413 answers that are not OpenAI error
#   objects, the prompt cache passing over a conversation's own entry) are reported, not failed
#   (for bisecting an older binary; the suite runs strict).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN=${1:-${CARGO_TARGET_DIR:-$ROOT/target}/release/kvsplit-mlx}
REQUESTS=${2:-360}
SEED=${3:-1}
MAX_TOKENS=16
QUEUE=2
CACHE_BYTES=$((24 << 20))
KV_BUDGET=$((64 << 20))
T0=$(date +%s)
LOG=$(mktemp)
PID=
trap '[ -n "$PID" ] && kill -9 "$PID" 2>/dev/null; rm -f "$LOG"' EXIT
. "$ROOT/scripts/server-lib.sh"
WHO=soak-test
serve_ours "$LOG" "$BIN" --port 0 --kv k8v4 --max-tokens "$MAX_TOKENS" --prompt-cache-bytes "$CACHE_BYTES" --kv-budget "$KV_BUDGET" --queue "$QUEUE" || exit 1
# The deadline bounds a run on a loaded machine, not its speed: alone the 360 requests take
# about 100 s; with two other jobs on CI's two cores they took over 240 s, and the suite asks
# for at least 300 answered.
if ! timeout 600 python3 "$ROOT/scripts/soak_test.py" "$URL" --pid "$PID" --requests "$REQUESTS" --seed "$SEED" \
    --queue "$QUEUE" --max-tokens "$MAX_TOKENS" --prompt-cache-bytes "$CACHE_BYTES" --kv-budget "$KV_BUDGET" --deadline 560 $([ -n "${SOAK_LENIENT:-}" ] || echo --strict); then
  echo "soak-test: server log:" >&2; tail -n 40 "$LOG" >&2
  kill -0 "$PID" 2>/dev/null || echo "soak-test: the server is not running any more" >&2
  exit 1
fi
if grep -q "panicked" "$LOG"; then grep -B2 -A5 "panicked" "$LOG" >&2; echo "soak-test: the server panicked (a 500 to some request)" >&2; exit 1; fi
kill -TERM "$PID"
for _ in $(seq 1 100); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$PID" 2>/dev/null; then echo "soak-test: still running 10 s after SIGTERM" >&2; exit 1; fi
wait "$PID" && rc=0 || rc=$?
PID=
[ "$rc" -eq 0 ] || { tail -n 40 "$LOG" >&2; echo "soak-test: exit status $rc after SIGTERM" >&2; exit 1; }
echo "soak-test: SIGTERM -> exit 0 ($(( $(date +%s) - T0 )) s in all)"
