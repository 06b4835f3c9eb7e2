#!/usr/bin/env bash
# The peers on serve-bench's ttft workload: each peer's OpenAI-compatible server is started on a
# free loopback port, sent the same two-turn ~TOKENS-token chat as ours (scripts/serve_bench.py
# ttft: streaming, max_tokens 32, temperature 0), and stopped. One JSON row per peer is appended
# to ROWS, with `engine` naming the server, its version and its KV cache setting. Called by
# scripts/serve-bench.sh (stage `peers`); runs alone too.
#
#   scripts/serve-peers-bench.sh TOKENS ROWS [ENGINES=mlxlm,mlxlm-kv8,llamacpp]
#
# Engines (all on the default model, SmolLM2-135M-Instruct Q4_1):
#   mlxlm      mlx_lm.server 0.32.2 on our `convert` of the GGUF (mlx-lm cannot read GGUF; the
#              default convert copies the Q4_1 weights exactly into MLX's 4-bit affine format,
#              so mlx-lm runs the same weights we do), KV cache unquantized (the model's float
#              dtype); its prompt cache is on by default
#   mlxlm-kv8  the same with `--kv-bits 8 --quantized-kv-start 0` (mlx-lm's only cache
#              quantization: one width for K and V, group 64; its default start is token 5000,
#              which would leave a 4K conversation unquantized; it serves requests one at a time
#              then)
#   llamacpp   llama-cpp-python 0.3.36's server (`python -m llama_cpp.server`) on the GGUF, K q8_0
#              / V q4_0 (`--type_k 8 --type_v 2`, flash attention on), n_ctx 8192 (more for a
#              longer conversation), threads = nproc, logits only for the last token; it reuses
#              the common prefix of the prompt already in its context. Started through
#              scripts/llamacpp_server.py, which turns llama.cpp's weight repacking off
#              (`--no-repack` in llama-server): the AMX repack crashes on this CPU.
# The peers live in venvs under $KVSPLIT_PEERS, set up by scripts/peers-env.sh; the first run
# installs what is missing (llama.cpp builds from source: about 10 minutes on 2 cores).
# Each server gets SERVER_READY_S (default 300) seconds to come up and the benchmark
# BENCH_TIMEOUT_S (default 3600); every server is killed when the script exits.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOKENS=${1:?usage: serve-peers-bench.sh TOKENS ROWS [ENGINES]} ROWS=${2:?usage: serve-peers-bench.sh TOKENS ROWS [ENGINES]}
ENGINES=${3:-mlxlm,mlxlm-kv8,llamacpp}
CACHE="${KVSPLIT_CACHE:-$HOME/.cache/kvsplit-mlx}"
BIN="${KVSPLIT_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/kvsplit-mlx}"
PY="${PYTHON:-python3}"
TEXT="$CACHE/data/wikitext-2-raw/wiki.test.raw"
GGUF="$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf"
MLX_DIR="$CACHE/models/SmolLM2-135M-Instruct-q4-mlx"
READY_S=${SERVER_READY_S:-300} BENCH_S=${BENCH_TIMEOUT_S:-3600}
THREADS=$(nproc)
N_CTX=$(( TOKENS + 1024 > 8192 ? TOKENS + 1024 : 8192 ))
say() { printf '[serve-peers] %s\n' "$*" >&2; }
. "$ROOT/scripts/peers-env.sh"
[ -f "$TEXT" ] || { echo "serve-peers-bench: WikiText-2 not found at $TEXT (scripts/serve-bench.sh fetches it)" >&2; exit 2; }
[ -f "$GGUF" ] || { echo "serve-peers-bench: $GGUF not found (scripts/setup.sh fetches it)" >&2; exit 2; }

TMP=$(mktemp -d)
PID=""
. "$ROOT/scripts/server-lib.sh"
WHO=serve-peers-bench
trap 'stop_server; rm -rf "$TMP"' EXIT
trap 'exit 143' TERM
trap 'exit 130' INT
# start LOG READY_PATH COMMAND...: runs COMMAND in the background and waits until GET
# READY_PATH answers 200 on $URL (set by the caller), the server dies, or READY_S passes.
start() {
  local log=$1 ready=$2; shift 2
  "$@" >"$log" 2>&1 &
  PID=$!
  wait_http "$ready" "$log" || exit 1
}
bench() {  # bench TAG_JSON [serve_bench.py options]
  local tag=$1; shift
  timeout "$BENCH_S" "$PY" "$ROOT/scripts/serve_bench.py" ttft "$URL" "$TEXT" "$TOKENS" - --tag "$tag" "$@" | tee -a "$ROWS"
}
version() { "$1" -c "import importlib.metadata as m; print(m.version('$2'))"; }

IFS=, read -r -a engines <<<"$ENGINES"
for engine in "${engines[@]}"; do
  case "$engine" in
    mlxlm|mlxlm-kv8) peers_mlxlm_venv
      if [ ! -f "$TMP/converted" ]; then
        say "converting $GGUF to $MLX_DIR with our convert (the Q4_1 weights as stored)"
        "$BIN" convert --from "$GGUF" --out "$MLX_DIR" --force >&2
        touch "$TMP/converted"
      fi
      v=$(version "$MLXLM_VENV/bin/python" mlx-lm) mlxv=$(version "$MLXLM_VENV/bin/python" mlx)
      extra=() kv="unquantized (the model's float dtype)"
      [ "$engine" = mlxlm ] || { extra=(--kv-bits 8 --kv-group-size 64 --quantized-kv-start 0); kv="8-bit K and V (--kv-bits 8, group 64, from token 0)"; }
      URL="http://127.0.0.1:$(free_port)"
      say "$engine: mlx_lm.server $v (mlx $mlxv, $MLXLM_BLAS_NOTE) on $URL"
      start "$TMP/$engine.log" /health env HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
        "$MLXLM_VENV/bin/python" -m mlx_lm.server --model "$MLX_DIR" --host 127.0.0.1 --port "${URL##*:}" \
        --max-tokens 32 --temp 0 "${extra[@]}"
      bench "{\"engine\": \"mlx_lm.server $v (mlx $mlxv CPU, $MLXLM_BLAS_NOTE), KV $kv\", \"peer\": \"$engine\", \"engine_version\": \"mlx-lm $v\", \"cache\": \"$kv\", \"weights\": \"our convert of the GGUF (Q4_1 as 4-bit affine)\"}"
      stop_server ;;
    llamacpp) peers_llamacpp_venv --server
      v=$(version "$LLAMA_VENV/bin/python" llama_cpp_python)
      URL="http://127.0.0.1:$(free_port)"
      say "llamacpp: llama-cpp-python $v server on $URL (K q8_0, V q4_0, n_ctx $N_CTX, $THREADS threads)"
      start "$TMP/llamacpp.log" /v1/models "$LLAMA_VENV/bin/python" "$ROOT/scripts/llamacpp_server.py" \
        --model "$GGUF" --host 127.0.0.1 --port "${URL##*:}" --n_ctx "$N_CTX" \
        --n_threads "$THREADS" --n_threads_batch "$THREADS" --flash_attn true --type_k 8 --type_v 2 \
        --logits_all false --verbose true
      bench "{\"engine\": \"llama.cpp server (llama-cpp-python $v, no repack), KV K q8_0 / V q4_0\", \"peer\": \"llamacpp\", \"engine_version\": \"llama-cpp-python $v\", \"cache\": \"K q8_0 / V q4_0 (flash attention)\", \"weights\": \"the GGUF (Q4_1)\"}" \
        --llamacpp-log "$TMP/llamacpp.log"
      stop_server ;;
    *) echo "serve-peers-bench: unknown engine '$engine' (mlxlm, mlxlm-kv8, llamacpp)" >&2; exit 2 ;;
  esac
done
