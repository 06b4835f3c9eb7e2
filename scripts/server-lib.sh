# Sourced by the scripts that start servers on loopback (serve-test, soak-test, serve-bench,
# serve-peers-bench, loadtest-bench): one way to start ours, wait for a peer, pick a port and stop.
# Each sets PID (the server) and URL; callers keep their own traps and messages' prefix in WHO.

# serve_ours LOG BIN SERVE_ARGS...: starts `BIN serve SERVE_ARGS...` with its output in LOG and
# waits (at most READY_S, default 120 s) for its "serving ... on http://..." line. Returns 1 with
# the log on stderr when it exits first or never says where it listens.
serve_ours() {
  local log=$1 bin=$2 i
  shift 2
  : >"$log"
  "$bin" serve "$@" >"$log" 2>&1 &
  PID=$!
  for i in $(seq 1 $((${READY_S:-120} * 5))); do
    grep -q "^serving " "$log" && break
    kill -0 "$PID" 2>/dev/null || { cat "$log" >&2; echo "${WHO:-server}: our server exited before listening" >&2; return 1; }
    sleep 0.2
  done
  URL=$(grep -m1 -o "http://[0-9.:]*" "$log")
  [ -n "$URL" ] || { cat "$log" >&2; echo "${WHO:-server}: our server never said where it listens" >&2; return 1; }
}

# wait_http PATH LOG: waits (at most READY_S) until GET $URL$PATH answers 200, returning 1 with
# the log's tail when the server ($PID) dies or time runs out.
wait_http() {
  local path=$1 log=$2 t=0
  until curl -sf -o /dev/null --max-time 5 "$URL$path"; do
    kill -0 "$PID" 2>/dev/null || { tail -n 30 "$log" >&2; echo "${WHO:-server}: the server exited while starting (log above)" >&2; return 1; }
    [ "$t" -lt $((${READY_S:-120} * 2)) ] || { tail -n 30 "$log" >&2; echo "${WHO:-server}: not ready after ${READY_S:-120}s" >&2; return 1; }
    sleep 0.5
    t=$((t + 1))
  done
}

# stop_server: SIGTERM, then SIGKILL after 10 s; clears PID.
stop_server() {
  [ -n "${PID:-}" ] || return 0
  kill -TERM "$PID" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$PID" 2>/dev/null || break; sleep 0.2; done
  kill -9 "$PID" 2>/dev/null || true
  wait "$PID" 2>/dev/null || true
  PID=""
}

free_port() { "${PY:-python3}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
