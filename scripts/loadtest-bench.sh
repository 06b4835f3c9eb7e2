#!/usr/bin/env bash
# The load test (scripts/loadtest.py) against our server and llama.cpp's own llama-server, on
# CPU, one after another on this machine, with the same model file and the same requests:
# N streaming chat requests at concurrency C, ~P prompt tokens each (distinct WikiText-2
# excerpts), up to M tokens each, temperature 0. Loopback only; every server is stopped when it
# is done and when the script exits. One JSON row per engine is appended to
# docs/data/loadtest.jsonl (LOADTEST_OUT), after a row with commit, date, machine and command.
#
#   scripts/loadtest-bench.sh [N=32] [C=4] [P=256] [M=64]
#
# Engines (LOADTEST_ENGINES, comma-separated, default all four, in this order):
#   ours-k8v4       kvsplit-mlx serve --kv k8v4 --decode-concurrency C --prompt-cache-bytes 0
#   ours-fp16       the same with --kv fp16
#   llamacpp-q8q4   llama-server -np C -c C*(P+M+64) -ctk q8_0 -ctv q4_0 -fa on --no-repack
#                   --cache-ram 0 -t $(nproc) (llama-server splits -c between its C slots;
#                   --cache-ram 0 turns off its host-memory prompt cache, which otherwise saves
#                   every slot's state, up to 8 GiB, whatever the request's cache_prompt: the
#                   counterpart of our --prompt-cache-bytes 0)
#   llamacpp-f16    the same with -ctk f16 -ctv f16
# llama-server is built once from the llama-cpp-python 0.3.36 sdist by
# scripts/llama-server-build.sh (about 4 minutes on 2 cores; cached under $KVSPLIT_PEERS). --no-repack:
# llama.cpp's weight repacking (AMX) crashes on this Xeon. loadtest.py sends `cache_prompt:
# false` (llama-server's prompt reuse off; ours ignores the field and keeps nothing with
# --prompt-cache-bytes 0) and one short warm-up request per server first.
#
# Environment: KVSPLIT_BIN (our binary; default $CARGO_TARGET_DIR or target/, release),
# KVSPLIT_BIN_COMMIT (the commit that binary was built from, when not this tree's HEAD),
# LOADTEST_MODEL (the GGUF; default $KVSPLIT_CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf),
# LLAMA_SERVER (a llama-server binary instead of building one), LLAMA_SERVER_ARGS (more
# llama-server flags, appended), LOADTEST_DEADLINE_S (each load
# test's deadline, default 300), SERVER_READY_S (default 120), LOADTEST_OUT, QUIET_WAIT_S (before
# each load test, wait at most this long for the machine to be idle; default 300, 0: no wait).
# The defaults (32 requests of ~256 + 64 tokens at concurrency 4, four engines) took 3m42s on the
# idle 2-core Xeon, plus the wait for idleness and, once, llama-server's build (~4 min). Exit status 1 when any request of any engine failed (the rows say which).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
N=${1:-32} C=${2:-4} P=${3:-256} M=${4:-64}
for v in "$N" "$C" "$P" "$M"; do [[ "$v" =~ ^[1-9][0-9]*$ ]] || { echo "usage: loadtest-bench.sh [N] [C] [P] [M] (positive integers)" >&2; exit 2; }; done
CACHE="${KVSPLIT_CACHE:-$HOME/.cache/kvsplit-mlx}"
BIN="${KVSPLIT_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/kvsplit-mlx}"
GGUF="${LOADTEST_MODEL:-$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
TEXT="$CACHE/data/wikitext-2-raw/wiki.test.raw"
OUT="${LOADTEST_OUT:-$ROOT/docs/data/loadtest.jsonl}"
ENGINES="${LOADTEST_ENGINES:-ours-k8v4,ours-fp16,llamacpp-q8q4,llamacpp-f16}"
DEADLINE=${LOADTEST_DEADLINE_S:-300} READY_S=${SERVER_READY_S:-120}
PY="${PYTHON:-python3}"
THREADS=$(nproc)
say() { printf '[loadtest-bench] %s\n' "$*" >&2; }
[ -f "$GGUF" ] || { echo "loadtest-bench: $GGUF not found (scripts/setup.sh fetches the default model)" >&2; exit 2; }
case ",$ENGINES," in *,ours-*) [ -x "$BIN" ] || { echo "loadtest-bench: no binary at $BIN (cargo build --release, or set KVSPLIT_BIN)" >&2; exit 2; } ;; esac
[ -f "$TEXT" ] || "$BIN" ppl wikitext --max-windows 1 --ctx 64 >/dev/null
mkdir -p "$(dirname "$OUT")"

TMP=$(mktemp -d)
PID=""
. "$ROOT/scripts/server-lib.sh"
WHO=loadtest-bench
trap 'stop_server; rm -rf "$TMP"' EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

# quiet: waits (at most QUIET_WAIT_S, default 300; 0: not at all) until the whole machine was
# less than 15% busy over 5 seconds, so that another job's build or benchmark is not measured
# with ours; says so when it gives up. Each row's other_cpu_s tells what other load remained.
quiet() {
  "$PY" - "${QUIET_WAIT_S:-300}" <<'PYEOF' >&2
import sys, time
limit = float(sys.argv[1])
def busy():
    v = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return sum(v[:8]) - v[3] - v[4], sum(v[:8])
end = time.monotonic() + limit
while True:
    b0, t0 = busy(); time.sleep(5); b1, t1 = busy()
    frac = (b1 - b0) / max(1, t1 - t0)
    if frac < 0.15:
        break
    if time.monotonic() >= end:
        print(f"[loadtest-bench] WARNING: the machine is still {frac:.0%} busy after {limit:.0f}s of waiting; measuring anyway (see other_cpu_s)")
        break
    print(f"[loadtest-bench] the machine is {frac:.0%} busy with other work; waiting")
PYEOF
}

# json KEY=VALUE...: a JSON object of strings (values as given, safely quoted).
json() { "$PY" -c 'import json, sys; print(json.dumps(dict(a.split("=", 1) for a in sys.argv[1:])))' "$@"; }

COMMIT=${BENCH_COMMIT:-$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)}
MACHINE="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) / $THREADS cores"
COMMAND="scripts/loadtest-bench.sh $N $C $P $M"
json commit="$COMMIT" date="$(date -u +%FT%TZ)" machine="$MACHINE" load_before="$(cut -d' ' -f1-3 /proc/loadavg)" \
  command="$COMMAND" engines="$ENGINES" model="$(basename "$GGUF")" >>"$OUT"

FAILED=0
# loadtest ENGINE VERSION CACHE SERVER_COMMAND: runs loadtest.py on $URL / $PID, appends its row.
loadtest() {
  local tag
  [ "${QUIET_WAIT_S:-300}" = 0 ] || quiet
  tag=$("$PY" -c 'import json, sys; k = ["engine", "engine_version", "cache", "server_command", "commit", "date", "machine", "command", "model"]; print(json.dumps(dict(zip(k, sys.argv[1:]))))' \
    "$1" "$2" "$3" "$4" "$COMMIT" "$(date -u +%FT%TZ)" "$MACHINE" "$COMMAND" "$(basename "$GGUF")")
  say "$1: $N requests, concurrency $C, ~$P prompt tokens, max $M tokens"
  "$PY" "$ROOT/scripts/loadtest.py" "$URL" --requests "$N" --concurrency "$C" --prompt-tokens "$P" --max-tokens "$M" \
    --pid "$PID" --deadline "$DEADLINE" --text "$TEXT" --tag "$tag" --json-out "$OUT" >/dev/null || FAILED=1
}

IFS=, read -r -a engines <<<"$ENGINES"
for engine in "${engines[@]}"; do
  case "$engine" in
    ours-k8v4|ours-fp16)
      kv=${engine#ours-}
      serve_ours "$TMP/$engine.log" "$BIN" --model "$GGUF" --host 127.0.0.1 --port 0 --kv "$kv" --decode-concurrency "$C" --prompt-cache-bytes 0 || exit 1
      version="kvsplit-mlx $("$BIN" --version | cut -d' ' -f2) (commit ${KVSPLIT_BIN_COMMIT:-$COMMIT})"
      loadtest "kvsplit-mlx serve" "$version" "$kv" "kvsplit-mlx serve --model $(basename "$GGUF") --port 0 --kv $kv --decode-concurrency $C --prompt-cache-bytes 0"
      stop_server ;;
    llamacpp-q8q4|llamacpp-f16)
      LS="${LLAMA_SERVER:-$("$ROOT/scripts/llama-server-build.sh")}"
      if [ "$engine" = llamacpp-q8q4 ]; then ck=q8_0 cv=q4_0; else ck=f16 cv=f16; fi
      port=$(free_port) ctx=$((C * (P + M + 64)))
      args=(-m "$GGUF" --host 127.0.0.1 --port "$port" -np "$C" -c "$ctx" -ctk "$ck" -ctv "$cv" -fa on --no-repack --cache-ram 0 -t "$THREADS" ${LLAMA_SERVER_ARGS:-})
      log="$TMP/$engine.log"
      "$LS" "${args[@]}" >"$log" 2>&1 &
      PID=$!
      URL="http://127.0.0.1:$port"
      wait_http /health "$log" || exit 1
      ggml=$(sed -n 's/^ggml: *//p' "$(dirname "$LS")/.built" 2>/dev/null | head -n1)
      version="llama-server $("$LS" --version 2>&1 | grep -m1 '^version:' | sed 's/^version: *//')${ggml:+, ggml $ggml} (llama.cpp of the llama-cpp-python 0.3.36 sdist)"
      loadtest "llama-server" "$version" "K $ck / V $cv (flash attention)" "llama-server ${args[*]/#$GGUF/$(basename "$GGUF")}"
      stop_server ;;
    *) echo "loadtest-bench: unknown engine '$engine' (ours-k8v4, ours-fp16, llamacpp-q8q4, llamacpp-f16)" >&2; exit 2 ;;
  esac
done
say "rows appended to $OUT"
"$PY" - "$OUT" "$COMMAND" <<'EOF' >&2
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
# the rows of this run: after the last meta row with this command
start = max(i for i, r in enumerate(rows) if r.get("command") == sys.argv[2] and "measure" not in r)
print(f"{'engine':<40} {'cache':<32} {'ok':>5} {'tok/s':>7} {'TTFT p50':>9} {'p99':>8} {'ITL p50':>8} {'p99':>7} {'peak RSS':>9} {'other CPU':>9}")
for r in rows[start + 1:]:
    if r.get("measure") != "loadtest":
        continue
    f = lambda x, d=0: "-" if x is None else f"{x:.{d}f}"
    print(f"{r['engine_version'][:40]:<40} {r['cache'][:32]:<32} {r['ok']:>2}/{r['requests']:<2} {r['agg_tok_s']:>7.1f} {f(r['ttft_p50_ms']):>7}ms {f(r['ttft_p99_ms']):>6}ms "
          f"{f(r['itl_p50_ms'], 1):>6}ms {f(r['itl_p99_ms'], 1):>5}ms {f(r.get('peak_rss_mb')):>6} MB {f(r.get('other_cpu_s'), 1):>7} s"
          + (f"  errors {r['errors']}" if r['errors'] else "")
          + ("  (other load on the machine during the run)" if (r.get('other_cpu_s') or 0) > 0.1 * (r.get('host_cpu_s') or 1) else ""))
EOF
exit "$FAILED"
