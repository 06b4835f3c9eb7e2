#!/usr/bin/env bash
# The server against real clients: starts `kvsplit-mlx serve` on a free loopback port, runs the
# official `openai` Python client over it (scripts/serve_openai_test.py, in a test venv from
# PyPI), then the chat page in headless Chromium (scripts/page-test.sh: Debian chromium and
# chromium-driver, selenium), then sends SIGTERM and checks the server exits 0. Bounded in time.
#
#   scripts/serve-test.sh [BIN] [SCREENSHOT]   (default: target/release/kvsplit-mlx, a temp file)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN=${1:-${CARGO_TARGET_DIR:-$ROOT/target}/release/kvsplit-mlx}
CACHE=${KVSPLIT_CACHE:-$HOME/.cache/kvsplit-mlx}
VENV="$CACHE/test-venvs/openai"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import openai" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "openai>=1.40,<3"
fi
LOG=$(mktemp)
trap 'kill -9 "$PID" 2>/dev/null || true; rm -f "$LOG"' EXIT
. "$ROOT/scripts/server-lib.sh"
WHO=serve-test
serve_ours "$LOG" "$BIN" --port 0 --kv k8v4 --max-tokens 64 || exit 1
timeout 600 "$VENV/bin/python" "$ROOT/scripts/serve_openai_test.py" "$URL"
SHOT=${2:-$(mktemp --suffix=.png)}
timeout 600 "$ROOT/scripts/page-test.sh" "$URL" "$SHOT"
kill -TERM "$PID"
for _ in $(seq 1 100); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$PID" 2>/dev/null; then echo "serve-test: still running 10 s after SIGTERM" >&2; exit 1; fi
wait "$PID" && rc=0 || rc=$?
[ "$rc" -eq 0 ] || { cat "$LOG" >&2; echo "serve-test: exit status $rc after SIGTERM" >&2; exit 1; }
echo "serve-test: SIGTERM -> exit 0"

# A saved cache (cache-prompt) seeds the prompt cache: a completion that starts with the saved
# document reuses all of its tokens.
DOC=$(mktemp)
TEXT="$CACHE/data/wikitext-2-raw/wiki.test.raw"
[ -f "$TEXT" ] || "$BIN" ppl wikitext --max-windows 1 --ctx 64 >/dev/null
head -c 3000 "$TEXT" >"$DOC"
"$BIN" cache-prompt --kv k8v4 --prompt-file "$DOC" --out "$DOC.safetensors" >"$LOG" 2>&1 || { cat "$LOG" >&2; exit 1; }
SAVED=$(grep -o "Prompt: [0-9]* tokens" "$LOG" | grep -o "[0-9]*")
serve_ours "$LOG" "$BIN" --port 0 --kv k8v4 --max-tokens 8 --prompt-cache-file "$DOC.safetensors" || exit 1
timeout 300 "$VENV/bin/python" - "$URL" "$DOC" "$SAVED" <<'PY'
import json, sys, urllib.request
url, doc, saved = sys.argv[1], open(sys.argv[2], newline="").read(), int(sys.argv[3])
body = json.dumps({"prompt": doc + " In summary,", "max_tokens": 8}).encode()
r = json.load(urllib.request.urlopen(urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"}), timeout=300))
kv = r["kv_cache"]
assert kv["prompt_cache_hit"] and kv["cached_tokens"] == saved, f"saved {saved} tokens, reused {kv}"
print(f"serve-test: --prompt-cache-file reused {kv['cached_tokens']} of {r['usage']['prompt_tokens']} prompt tokens")
PY
kill -TERM "$PID"
wait "$PID" || { echo "serve-test: exit status $? after SIGTERM (prompt-cache-file run)" >&2; exit 1; }
rm -f "$DOC" "$DOC.safetensors"
