#!/usr/bin/env bash
# Quality per byte, ours against llama.cpp (issue #18 evidence): for each model, `kvsplit-mlx
# ppl` over the same windows llama.cpp was scored on (16 windows of 512, chunks of 128, the
# second half scored) at
#   - the plain presets (--kv-plain: uniform bits, group 64, no rotation; what llama.cpp means),
#   - the presets as they run by default (the model's shipped recipe, else the general choice),
#   - uniform 6-bit and 3-bit settings, rotated,
# then the llama.cpp rows of docs/data/llamacpp-kld-<model>.csv (scripts/llamacpp-kld.sh --docs)
# converted to our row format, and one figure per model: KLD against bytes per token with both
# engines' points and our frontier (docs/figures/quality/<model>/kld-per-byte.png).
#
# Usage: scripts/quality-frontier.sh [--windows N] [--models smollm2,gemma,qwen]
# Output: docs/data/quality-<model>.csv/.json (ours), docs/data/quality-<model>-llamacpp.csv
# (converted), docs/figures/quality/<model>/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${KVSPLIT_CACHE:-$HOME/.cache/kvsplit-mlx}"
WINDOWS=16
MODELS=smollm2,gemma,qwen
while [ $# -gt 0 ]; do
  case "$1" in
    --windows) WINDOWS="$2"; shift 2 ;;
    --models) MODELS="$2"; shift 2 ;;
    *) echo "quality-frontier: unknown argument $1" >&2; exit 2 ;;
  esac
done
cd "$ROOT"
"$ROOT/scripts/setup.sh"
"$ROOT/scripts/fetch-test-data.sh"
[ -x "$ROOT/scripts/fetch-models.sh" ] && "$ROOT/scripts/fetch-models.sh"
cargo build --release -q -p kvsplit-mlx
BIN="$ROOT/target/release/kvsplit-mlx"
OUT="$ROOT/docs/data"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

run_model() {  # name gguf text-args llamacpp-csv
  local name=$1 model=$2 text=$3 peer=$4
  echo "== $name" >&2
  rm -rf "$tmp/$name" && mkdir -p "$tmp/$name"
  local common=(--model "$model" --ctx 512 --chunk 128 --max-windows "$WINDOWS" --out "$tmp/$name")
  # shellcheck disable=SC2086
  "$BIN" ppl $text "${common[@]}" --kv fp16,k8v8,k8v4,k4v4,k4v2 --kv-plain
  # shellcheck disable=SC2086
  "$BIN" ppl $text "${common[@]}" --kv k8v8,k8v4,k4v4,k4v2
  # shellcheck disable=SC2086
  "$BIN" ppl $text "${common[@]}" --kv 6,6 --kv 6,4 --kv 4,3 --kv 3,3 --kv-rotate kv
  local csv
  csv=$(ls "$tmp/$name"/ppl-*.csv)
  cp "$csv" "$OUT/quality-$name.csv"
  cp "${csv%.csv}.json" "$OUT/quality-$name.json"
  python3 - "$peer" "$OUT/quality-$name.csv" "$OUT/quality-$name-llamacpp.csv" <<'PY'
import csv, sys
peer, ours, out = sys.argv[1:]
mine = list(csv.DictReader(open(ours)))
fields = list(mine[0].keys())
model = mine[0]["model"]
rows = []
for r in csv.DictReader(open(peer)):
    if r["cache_k"] == "f16" and r["cache_v"] == "f16":
        continue  # the baseline, and llama.cpp's own floor row
    rot = "" if r["kv_rotation"] in ("K+V", "") else "-norot"
    kv = r["cache_k"] if r["cache_k"] == r["cache_v"] else f"{r['cache_k']}/{r['cache_v']}"
    row = {f: "" for f in fields}
    row.update({
        "model": model, "kv": kv + rot, "kv_source": f"llama.cpp ({r['version']}, rotation {r['kv_rotation']})",
        "ctx": r["ctx"], "chunk": r["chunk"], "score_all": "false", "windows": r["windows"],
        "tokens_scored": r["tokens_scored"], "ppl": r["ppl"], "ppl_stderr": r["ppl_stderr"],
        "kld_mean": r["kld_mean"], "kld_p99": r["kld_p99"], "top1_agree": r["top1_agree"],
        "delta_ppl_pct": r["delta_ppl_pct"], "delta_ppl_se_pct": r["delta_ppl_se_pct"], "kld_se": r["kld_se"],
        "kv_bytes_per_token": r["bytes_per_token"], "backend": "cpu", "mlx_version": "",
        "engine": "llama.cpp", "commit": r["commit"], "date": r["date"],
    })
    rows.append(row)
with open(out, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
print(f"{out}: {len(rows)} llama.cpp rows")
PY
  mkdir -p "docs/figures/quality/$name"
  "$BIN" plot "$OUT/quality-$name.csv" "$OUT/quality-$name-llamacpp.csv" --out "docs/figures/quality/$name"
}

wiki="$CACHE/data/wikitext-2-raw/wiki.test.raw"
for m in ${MODELS//,/ }; do
  case "$m" in
    smollm2) run_model smollm2 "$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf" "--file $wiki" "$OUT/llamacpp-kld-SmolLM2-135M-Instruct.Q4_1.csv" ;;
    gemma) run_model gemma "$CACHE/models/gemma-3-270m-q4_k_m.gguf" "--file $wiki" "$OUT/llamacpp-kld-gemma-3-270m-q4_k_m.csv" ;;
    qwen) run_model qwen "$CACHE/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf" "--file $CACHE/data/code/llama-vocab.cpp" \
      "$OUT/llamacpp-kld-qwen2.5-coder-0.5b-instruct-q4_k_m-llama-vocab.csv" ;;
    *) echo "quality-frontier: unknown model $m (smollm2, gemma, qwen)" >&2; exit 2 ;;
  esac
done
