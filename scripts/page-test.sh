#!/usr/bin/env bash
# Headless-Chromium test of the chat page that `kvsplit-mlx serve` returns at `/`.
#   scripts/page-test.sh URL [SCREENSHOT]     a running server, e.g. http://127.0.0.1:8080
#   scripts/page-test.sh --mock [SCREENSHOT]  against scripts/page_mock_server.py, started here
# SCREENSHOT defaults to ${KVSPLIT_CACHE:-$HOME/.cache/kvsplit-mlx}/page-test/page.png.
# Needs Debian's chromium and chromium-driver (installed here when running as root) and selenium
# from PyPI, in a venv under $KVSPLIT_CACHE/test-venvs/page. Loopback only; every step is bounded.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${KVSPLIT_CACHE:-$HOME/.cache/kvsplit-mlx}"
VENV="$CACHE/test-venvs/page"
PY="${PYTHON:-python3}"
# Whole-test bound: two answers at most 120 s each, plus browser start and the error turn.
TEST_TIMEOUT_S=360
say() { printf '[page-test] %s\n' "$*" >&2; }
die() { say "FAIL: $*"; exit 1; }

[ $# -ge 1 ] && [ $# -le 2 ] || die "usage: scripts/page-test.sh URL|--mock [SCREENSHOT]"
TARGET=$1
SHOT=${2:-$CACHE/page-test/page.png}
mkdir -p "$(dirname "$SHOT")"

# (a) Chromium and its driver, from Debian.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" -ne 0 ]; then
    die "chromium and chromedriver are not on PATH; install the Debian packages as root:" \
        "apt-get install -y --no-install-recommends chromium chromium-driver"
  fi
  say "installing Debian chromium and chromium-driver"
  export DEBIAN_FRONTEND=noninteractive
  # A fresh container has empty package lists; update only when the install needs it.
  apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null 2>&1 || {
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null
  }
  command -v chromium >/dev/null && command -v chromedriver >/dev/null \
    || die "installed chromium and chromium-driver, yet chromium or chromedriver is still not on PATH"
fi

# (b) selenium from PyPI, in its own venv.
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import selenium' 2>/dev/null; then
  say "creating $VENV with selenium"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check 'selenium>=4.11,<5'
fi

# (c) the test, against the given server or a mock started here.
MOCK_PID=
cleanup() { if [ -n "$MOCK_PID" ]; then kill "$MOCK_PID" 2>/dev/null || true; fi; }
trap cleanup EXIT
if [ "$TARGET" = --mock ]; then
  MOCK_OUT=$CACHE/page-test/mock.out
  mkdir -p "$(dirname "$MOCK_OUT")"
  : >"$MOCK_OUT"
  "$PY" "$ROOT/scripts/page_mock_server.py" --port 0 >"$MOCK_OUT" 2>"$MOCK_OUT.log" &
  MOCK_PID=$!
  URL=
  for _ in $(seq 50); do
    URL=$(sed -n 's/^listening on //p' "$MOCK_OUT")
    [ -n "$URL" ] && break
    kill -0 "$MOCK_PID" 2>/dev/null || break
    sleep 0.2
  done
  [ -n "$URL" ] || die "the mock server did not start: $(cat "$MOCK_OUT.log")"
  say "mock server at $URL (log: $MOCK_OUT.log)"
else
  URL=$TARGET
fi

say "testing $URL"
# Selenium Manager must not try the network: chromedriver is given explicitly, this is a backstop.
SE_OFFLINE=true timeout --kill-after=10 "$TEST_TIMEOUT_S" \
  "$VENV/bin/python" "$ROOT/scripts/page_test.py" "$URL" "$SHOT" \
  || { rc=$?; [ "$rc" -eq 124 ] && die "the test ran past ${TEST_TIMEOUT_S} s"; exit "$rc"; }
