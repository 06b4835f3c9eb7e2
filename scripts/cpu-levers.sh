#!/usr/bin/env bash
# Issue #8's levers on the CPU, each measured by switching it off, one configuration after
# another on this machine: our CPU primitives (`--cpu-kernels off`: MLX ops only, the previous
# engine), quantized weights vs f32 (`--weights dense`), threads of our kernels
# (`--cpu-threads 1`) and of OpenBLAS (env OPENBLAS_NUM_THREADS=1, OpenBLAS's own). Rows: `bench` of the default
# model at a few depths; raw CSVs and a table go to docs/data/cpu-levers.{csv,md}.
#
#   scripts/cpu-levers.sh [DEPTHS]     (default 0,4096; env KV=fp16,k8v4, N=32, R=2)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEPTHS=${1:-0,4096}
KV=${KV:-fp16,k8v4} N=${N:-32} R=${R:-2}
[[ "$DEPTHS" =~ ^[0-9]+(,[0-9]+)*$ ]] || { echo "cpu-levers: DEPTHS must be comma-separated whole numbers, got '$DEPTHS'" >&2; exit 2; }
"$ROOT/scripts/setup.sh"
(cd "$ROOT" && cargo build --release -q -p kvsplit-mlx)
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/kvsplit-mlx"
OUT="$ROOT/docs/data"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
# label|engine flags|environment (only OpenBLAS's own thread count is an environment variable)
configs=(
  "all levers (default)||"
  "no CPU primitives, f32 weights (previous engine)|--cpu-kernels off --weights dense|"
  "primitives on, f32 weights (no matvec)|--weights dense|"
  "no CPU primitives, quantized weights (dequantize per call)|--cpu-kernels off|"
  "primitives on 1 thread|--cpu-threads 1|"
  "OpenBLAS on 1 thread||OPENBLAS_NUM_THREADS=1"
)
i=0
for c in "${configs[@]}"; do
  IFS='|' read -r label flags envs <<<"$c"
  echo "[cpu-levers] $label ($flags $envs), load $(cut -d' ' -f1 /proc/loadavg)" >&2
  # shellcheck disable=SC2086 # flags and envs are word lists
  env $envs "$BIN" bench $flags --kv "$KV" -d "$DEPTHS" --fill random -p 64 -n "$N" -r "$R" --out "$TMP" --name "c$i" >/dev/null
  echo "$label|$(echo "$flags $envs" | xargs)|$(cut -d' ' -f1 /proc/loadavg)" > "$TMP/c$i.label"
  i=$((i + 1))
done
python3 - "$TMP" "$OUT" "$i" <<'PY'
import csv, sys
tmp, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = []
for i in range(n):
    label, envs, load = open(f"{tmp}/c{i}.label").read().strip().split("|")
    for r in csv.DictReader(open(f"{tmp}/c{i}.csv")):
        rows.append({"config": label, "setting": envs or "(defaults)", "load_after": load, **r})
with open(f"{out}/cpu-levers.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
    w.writeheader()
    w.writerows(rows)
with open(f"{out}/cpu-levers.md", "w") as f:
    r0 = rows[0]
    f.write(f"# CPU levers ({r0['machine']}, {r0['backend']}, MLX {r0['mlx_version']}, commit {r0['commit']}, {r0['date']})\n\n")
    f.write("`scripts/cpu-levers.sh`: `kvsplit-mlx bench --fill random -p 64` per configuration; decode is the median of the repeats.\n\n")
    f.write("| configuration | flags / env | kv | depth | prefill tok/s (64 tokens at depth) | decode tok/s | load after |\n|---|---|---|---:|---:|---:|---:|\n")
    for r in rows:
        f.write(f"| {r['config']} | `{r['setting']}` | {r['kv']} | {r['depth']} | {float(r['prefill_tps_median']):.1f} | {float(r['decode_tps_median']):.2f} | {r['load_after']} |\n")
print(open(f"{out}/cpu-levers.md").read())
PY
