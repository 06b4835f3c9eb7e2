#!/usr/bin/env bash
# Starts N ranks of a command on this machine as MLX's launcher (`mlx.launch --backend ring`)
# would: a hostfile of 127.0.0.1 ports (one per rank, JSON as MLX reads it) in MLX_HOSTFILE and
# each rank's MLX_RANK. Rank 0's stdout is this script's; every rank's stderr is prefixed with
# its rank. Stops every rank when one fails, and after --timeout seconds (default 600).
#   scripts/launch-local.sh [--timeout S] N COMMAND [ARGS...]
# e.g. scripts/launch-local.sh 2 target/release/kvsplit-mlx generate --distributed ring --model M --kv 8,4
set -uo pipefail
timeout=600
if [ "${1:-}" = --timeout ]; then timeout=${2:?--timeout needs seconds}; shift 2; fi
n=${1:-}
if ! [[ "$n" =~ ^[1-9][0-9]*$ ]] || [ $# -lt 2 ]; then
  echo "usage: scripts/launch-local.sh [--timeout S] N COMMAND [ARGS...] (N: number of ranks)" >&2
  exit 2
fi
shift
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
ports=$(python3 - "$n" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
)
python3 - "$dir/hosts.json" $ports <<'PY'
import json, sys
json.dump([[f"127.0.0.1:{p}"] for p in sys.argv[2:]], open(sys.argv[1], "w"))
PY
pids=()
for ((r = 0; r < n; r++)); do
  if [ "$r" = 0 ]; then
    MLX_RANK=$r MLX_HOSTFILE="$dir/hosts.json" timeout "$timeout" "$@" 2> >(sed -u "s/^/[rank $r] /" >&2) &
  else
    MLX_RANK=$r MLX_HOSTFILE="$dir/hosts.json" timeout "$timeout" "$@" > /dev/null 2> >(sed -u "s/^/[rank $r] /" >&2) &
  fi
  pids+=($!)
done
status=0
# The first rank to fail takes the others down: a peer waiting in a collective never returns.
while [ ${#pids[@]} -gt 0 ]; do
  wait -n -p done "${pids[@]}"; rc=$?
  pids=("${pids[@]/$done}")
  pids=(${pids[@]})
  if [ "$rc" != 0 ]; then
    status=$rc
    [ ${#pids[@]} -gt 0 ] && kill "${pids[@]}" 2>/dev/null
  fi
done
exit "$status"
