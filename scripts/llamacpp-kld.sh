#!/usr/bin/env bash
# llama.cpp's KV cache types scored the way `kvsplit-mlx ppl` scores ours (issue #18): perplexity,
# KL divergence against llama.cpp's f16 cache and bytes per token. Runs scripts/llamacpp-kld.py
# in the llama.cpp venv, which scripts/peers-env.sh creates when missing (llama-cpp-python 0.3.36
# built from its sdist: about 10 minutes on 2 cores).
#
#   scripts/llamacpp-kld.sh --model F.gguf --text T [options of llamacpp-kld.py]   one run
#   scripts/llamacpp-kld.sh --docs [--out DIR] [options]   the runs of docs/data/README.md:
#       SmolLM2-135M and Gemma-3-270M on WikiText-2, Qwen2.5-Coder-0.5B on llama-vocab.cpp,
#       16 windows of 512 tokens, chunks of 128, into DIR (default docs/data); each model with
#       every cache type, then q8_0, q4_0 and q8_0/q4_0 again with llama.cpp's rotation off
#
# --docs fetches what it needs: Gemma and Qwen (scripts/fetch-models.sh) and the code text
# (scripts/fetch-test-data.sh). SmolLM2 and WikiText-2 come from scripts/setup.sh.
# `scripts/llamacpp-kld.sh --help` shows the options of llamacpp-kld.py.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${KVSPLIT_CACHE:-$HOME/.cache/kvsplit-mlx}"
PY="${PYTHON:-python3}"
say() { printf '[llamacpp-kld] %s\n' "$*" >&2; }
# PEERS, LLAMACPP_VERSION, LLAMA_VENV, peers_llamacpp_venv
. "$ROOT/scripts/peers-env.sh"

if [ "${1:-}" != --docs ]; then
  peers_llamacpp_venv
  shown="scripts/llamacpp-kld.sh${*:+ $*}"
  exec "$LLAMA_VENV/bin/python" "$ROOT/scripts/llamacpp-kld.py" --command-line "${shown//$CACHE/\$KVSPLIT_CACHE}" "$@"
fi
shift
OUT="$ROOT/docs/data"
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="${2:?--out needs a directory}"; shift 2 ;;
    --model|--text|--max-windows|--ctx|--chunk)
      echo "llamacpp-kld: --docs fixes $1 (run without --docs to choose it)" >&2; exit 2 ;;
    *) EXTRA+=("$1"); shift ;;
  esac
done

WIKI="$CACHE/data/wikitext-2-raw/wiki.test.raw"
[ -f "$WIKI" ] || WIKI="$ROOT/../shared/data/wikitext-2-raw/wiki.test.raw"
[ -f "$WIKI" ] || { echo "llamacpp-kld: WikiText-2 (wiki.test.raw) not found in $CACHE/data/wikitext-2-raw; run scripts/setup.sh" >&2; exit 2; }
SMOL="$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf"
[ -f "$SMOL" ] || { echo "llamacpp-kld: $SMOL not found; run scripts/setup.sh (it fetches the default model)" >&2; exit 2; }
"$ROOT/scripts/fetch-models.sh"
"$ROOT/scripts/fetch-test-data.sh"
peers_llamacpp_venv

# run MODEL TEXT [more options]: one model, one text, 16 windows of 512 in chunks of 128.
run() {
  local model="$1" text="$2"; shift 2
  local args=(--model "$model" --text "$text" --ctx 512 --chunk 128 --max-windows 16 "$@" --out "$OUT" ${EXTRA[@]+"${EXTRA[@]}"})
  say "$(basename "$model") on $(basename "$text")${*:+ ($*)}"
  # The recorded command names the model and text by their place in the cache, not this machine's paths.
  local shown="scripts/llamacpp-kld.sh ${args[*]}"
  shown="${shown//$CACHE/\$KVSPLIT_CACHE}"
  nice "$LLAMA_VENV/bin/python" "$ROOT/scripts/llamacpp-kld.py" --command-line "${shown//$ROOT\//}" "${args[@]}"
}
# Each model twice: every cache type as llama.cpp runs it (Hadamard rotation on, its default,
# plus the kernel-floor row), then three of them with the rotation off, to show what it buys.
NO_ROT=(--rotation off --settings q8_0,q4_0,q8_0/q4_0 --no-kernel-floor)
QWEN="$CACHE/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf" GEMMA="$CACHE/models/gemma-3-270m-q4_k_m.gguf"
CODE="$CACHE/data/code/llama-vocab.cpp"
run "$SMOL" "$WIKI"
run "$GEMMA" "$WIKI"
run "$QWEN" "$CODE"
run "$SMOL" "$WIKI" "${NO_ROT[@]}"
run "$GEMMA" "$WIKI" "${NO_ROT[@]}"
run "$QWEN" "$CODE" "${NO_ROT[@]}"
