#!/usr/bin/env bash
# Issue #8's evidence: one workload (the default SmolLM2-135M Q4_1 GGUF, a WikiText-2 prompt,
# greedy decode) through kvsplit-mlx, llama.cpp and mlx-lm, one after another on this machine,
# with a ratio table written to docs/cpu-side-by-side.md and raw rows to docs/data/.
#
#   scripts/cpu-side-by-side.sh [--prompt-tokens 4000] [--gen 64] [--repeats 1]
#                               [--skip-llamacpp] [--skip-mlxlm] [--out docs]
#                               [--model default|qwen] [--llamacpp-caches f16,q8_0/q4_0]
#                               [--f16-decode-factor 1.0]
#
# --model qwen runs Qwen2.5-Coder-0.5B Q4_K_M (ASSETS.md; 32K context, for #20's 16K and 32K
# rows, where SmolLM2's 8K maximum stops) without mlx-lm (its f32 conversion would be 2 GB and
# no target compares with it there); its doc is docs/cpu-side-by-side-qwen-<prompt>.md.
#
# The peers are development tools, installed into venvs under $KVSPLIT_PEERS (default
# ~/.cache/kvsplit-mlx-peers) by scripts/peers-env.sh, never project dependencies:
#   llamacpp-venv  llama-cpp-python 0.3.36 (built from its sdist: about 10 minutes on 2 cores)
#   mlxlm-venv     mlx 0.32.2 + mlx-cpu 0.32.2 (the MLX we link) + mlx-lm 0.32.2, on OpenBLAS
# mlx-lm cannot read GGUF: it runs on our `convert --dequantize --dtype f32` of the same file.
# The binary comes from $CARGO_TARGET_DIR (default target/).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${KVSPLIT_CACHE:-$HOME/.cache/kvsplit-mlx}"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
PY="${PYTHON:-python3}"
TEXT="$ROOT/../shared/data/wikitext-2-raw/wiki.test.raw"
say() { printf '[side-by-side] %s\n' "$*" >&2; }
# PEERS, the pinned versions, LLAMA_VENV, MLXLM_VENV, peers_llamacpp_venv, peers_mlxlm_venv
. "$ROOT/scripts/peers-env.sh"

PROMPT=4000 GEN=64 REPEATS=1 OUT="$ROOT/docs" SKIP_LLAMA=0 SKIP_MLXLM=0 MODEL=default CACHES="f16,q8_0/q4_0" FACTOR=1.0
COMMAND_LINE="scripts/cpu-side-by-side.sh${*:+ $*}"
while [ $# -gt 0 ]; do
  case "$1" in
    --prompt-tokens) PROMPT="${2:?--prompt-tokens needs a value}"; shift 2 ;;
    --gen) GEN="${2:?--gen needs a value}"; shift 2 ;;
    --repeats) REPEATS="${2:?--repeats needs a value}"; shift 2 ;;
    --out) OUT="${2:?--out needs a directory}"; shift 2 ;;
    --skip-llamacpp) SKIP_LLAMA=1; shift ;;
    --skip-mlxlm) SKIP_MLXLM=1; shift ;;
    --model) MODEL="${2:?--model needs default or qwen}"; shift 2 ;;
    --llamacpp-caches) CACHES="${2:?--llamacpp-caches needs a list}"; shift 2 ;;
    --f16-decode-factor) FACTOR="${2:?--f16-decode-factor needs a value}"; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "cpu-side-by-side: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
for v in "--prompt-tokens:$PROMPT" "--gen:$GEN" "--repeats:$REPEATS"; do
  [[ "${v#*:}" =~ ^[1-9][0-9]*$ ]] || { echo "cpu-side-by-side: ${v%%:*} must be a positive whole number, got '${v#*:}'" >&2; exit 2; }
done
[[ "$FACTOR" =~ ^[0-9]+(\.[0-9]+)?$ ]] || { echo "cpu-side-by-side: --f16-decode-factor must be a number, got '$FACTOR'" >&2; exit 2; }
case "$MODEL" in
  default) GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf STEM=cpu-side-by-side ;;
  qwen) GGUF_NAME=qwen2.5-coder-0.5b-instruct-q4_k_m.gguf STEM="cpu-side-by-side-qwen-$PROMPT" SKIP_MLXLM=1 ;;
  *) echo "cpu-side-by-side: --model must be default or qwen, got '$MODEL'" >&2; exit 2 ;;
esac
[ -f "$TEXT" ] || { echo "cpu-side-by-side: WikiText-2 not found at $TEXT" >&2; exit 2; }
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"

# --- our engine --------------------------------------------------------------------------
"$ROOT/scripts/setup.sh"
say "building kvsplit-mlx (release) in $TARGET"
(cd "$ROOT" && CARGO_TARGET_DIR="$TARGET" cargo build --release -q -p kvsplit-mlx)
BIN="$TARGET/release/kvsplit-mlx"
GGUF="$CACHE/models/$GGUF_NAME"
# The Qwen model is one of fetch-models.sh's extra models, not setup's.
[ -f "$GGUF" ] || "$ROOT/scripts/fetch-models.sh"
[ -f "$GGUF" ] || { echo "cpu-side-by-side: $GGUF is missing after scripts/fetch-models.sh" >&2; exit 2; }
# Which BLAS libmlx.so resolves to: setup.sh swaps OpenBLAS in under the wheel's file names,
# so look for libopenblas among the resolved libraries. ldd's output is kept in a variable:
# `ldd | grep -q` fails under pipefail when grep exits first and ldd gets SIGPIPE.
blas_of() {
  local libs; libs="$(ldd "$1")"
  case "$libs" in
    *libopenblas*) echo "OpenBLAS ($(grep -o '/[^ ]*libopenblas[^ ]*' <<<"$libs" | head -n1))" ;;
    *) echo "reference BLAS bundled with the mlx-cpu wheel" ;;
  esac
}
OUR_BLAS="$(blas_of "$BIN"); $("$BIN" info 2>/dev/null | sed -n 's/^CPU BLAS: *//p')"

# --- llama.cpp -----------------------------------------------------------------------------
[ "$SKIP_LLAMA" = 1 ] || peers_llamacpp_venv

# --- mlx-lm on the same MLX, with OpenBLAS ------------------------------------------------
MLX_DIR="$CACHE/models/SmolLM2-135M-Instruct-f32-mlx"
if [ "$SKIP_MLXLM" = 0 ]; then
  peers_mlxlm_venv
  # Converted on every run (about 2 s), so mlx-lm always reads what our current converter writes.
  say "converting $GGUF to $MLX_DIR with our convert"
  "$BIN" convert --from "$GGUF" --out "$MLX_DIR" --dequantize --dtype f32 --force >&2
fi

# mlx-lm's MLX loads the same OpenBLAS, which may not recognise this CPU and fall back to its
# SSE3 Prescott kernels; our engine moves itself onto the CPU's kernels at start
# (mlx_ext::options::blas_kernels). Both MLX users get the kernels ours reports.
core="$("$BIN" info 2>/dev/null | sed -n 's/^CPU BLAS: *OpenBLAS \([A-Za-z0-9]*\) kernels.*/\1/p')"
if [ -n "$core" ] && [ -z "${OPENBLAS_CORETYPE:-}" ]; then
  export OPENBLAS_CORETYPE="$core"
  say "OpenBLAS kernels for both MLX users: $core"
fi
say "load average before: $(cat /proc/loadavg)"
args=(report --text "$(cd "$(dirname "$TEXT")" && pwd)/$(basename "$TEXT")" --prompt-tokens "$PROMPT" --gen "$GEN"
      --repeats "$REPEATS" --gguf "$GGUF" --mlx-dir "$MLX_DIR" --bin "$BIN" --our-blas "$OUR_BLAS"
      --llamacpp-python "$LLAMA_VENV/bin/python" --mlxlm-python "$MLXLM_VENV/bin/python" --out "$OUT"
      --command-line "$COMMAND_LINE" --stem "$STEM" --llamacpp-caches "$CACHES" --f16-decode-factor "$FACTOR")
[ "$SKIP_LLAMA" = 1 ] && args+=(--skip-llamacpp)
[ "$SKIP_MLXLM" = 1 ] && args+=(--skip-mlxlm)
# mlx-lm's tokenizer stack (transformers) warns about missing torch etc.; keep its stderr
# but not its telemetry or parallelism chatter.
TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 "$PY" "$ROOT/scripts/side_by_side.py" "${args[@]}"
