#!/usr/bin/env bash
# Stages kvsplit-mlx (generate, ppl, bench, and the fused-kernel and matvec checks) for the lent GPU, with
# the default model, WikiText-2 and mlx-lm for comparisons. It does not touch the GPU; it ends
# by printing the `run` calls to make. See ../shared/device/README.md for the two-part MLX
# runtime; this adds the binaries and data to the same calls.
#
# One call carries at most 64 MiB (the working tree included), and the MLX CUDA library alone
# is 65 MB compressed, so a cold machine takes two calls before anything runs, and a third if
# the real model is needed (the 98 MB GGUF does not compress: it is split across the calls):
#   A  .device/p1 (half the CUDA libmlx) + .device/m1 (model part 1)   -> moved to /tmp
#   B  .device/p2 + .device/rt (binaries, env, data, wheels) + .device/m2 (model part 2)
#      `source .device/rt/gpu-env.sh` assembles everything under /tmp and copies rt there, so
#      later calls on the warm machine `source /tmp/kvrt/gpu-env.sh` and carry nothing.
#   C  .device/m3 (model part 3), only for runs of the real model (generate, ppl, bench --model),
#      and D .device/m4 (part 4) when the working tree leaves the calls too little room for it
# Random-weight speed runs (`bench --random-model`) need no model and can run in call B.
#
# Usage: scripts/gpu-run.sh        (builds with $CARGO_TARGET_DIR, default target/)
set -euo pipefail
root=$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel)
cd "$root"
target=${CARGO_TARGET_DIR:-$root/target}
cache=${KVSPLIT_CACHE:-$HOME/.cache/kvsplit-mlx}
model=$cache/models/SmolLM2-135M-Instruct.Q4_1.gguf
wiki=${KVSPLIT_WIKITEXT:-$root/../shared/data/wikitext-2-raw/wiki.test.raw}
limit=$((64 * 1024 * 1024))
margin=$((3 * 512 * 1024))

"$root/scripts/setup.sh"
../shared/device/stage-mlx-cuda.sh .device >/dev/null
CARGO_TARGET_DIR=$target cargo build --release -q -p kvsplit-mlx
CARGO_TARGET_DIR=$target cargo build --release -q -p mlx-kv --example fused_check
CARGO_TARGET_DIR=$target cargo build --release -q -p mlx-ext --example qmv_check
# write_random_gguf makes the random Llama-3.1-8B Q4_0 GGUF on the GPU machine (4.5 GB, too big
# to carry), the one file both this engine and llama.cpp's CUDA build are timed on.
CARGO_TARGET_DIR=$target cargo build --release -q -p models --example write_random_gguf
for b in "$target/release/kvsplit-mlx" "$target/release/examples/fused_check" "$target/release/examples/qmv_check" "$target/release/examples/write_random_gguf"; do
  # An RPATH (old dtags) would be searched before LD_LIBRARY_PATH and load the CPU libmlx.so.
  readelf -d "$b" | grep -q RUNPATH || { echo "gpu-run: $b has no RUNPATH" >&2; exit 1; }
  # xz: the stripped CLI is over 13 MB and every byte of a call counts against the model's share.
  strip -o ".device/rt/$(basename "$b")" "$b"
  xz -9 -f -S .bin.xz ".device/rt/$(basename "$b")"
done
rm -f .device/rt/conformance .device/rt/kvsplit-mlx .device/rt/fused_check .device/rt/qmv_check .device/rt/write_random_gguf
mkdir -p .device/rt/whl .device/rt/data
install -m 644 "$wiki" .device/rt/data/wiki.test.raw
# MLX's Python package (linked against libmlx.so, which the CUDA runtime provides) and mlx-lm,
# pure Python; both 0.32.2, the version of the staged library.
if [ ! -f .device/rt/whl/.ok ]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_35_x86_64 -d .device/rt/whl mlx==0.32.2
  python3 -m pip download -q --no-deps -d .device/rt/whl mlx-lm==0.32.2
  touch .device/rt/whl/.ok
fi
cp "$model" /dev/null # fail early if setup did not fetch it
sha=$(sha256sum "$model" | cut -d' ' -f1)

cat > .device/rt/gpu-env.sh <<ENV
# Source on the GPU machine from the project root (call B), or /tmp/kvrt/gpu-env.sh later.
here=\$(cd "\$(dirname "\${BASH_SOURCE[0]}")" && pwd)
if [ "\$here" != /tmp/kvrt ]; then
  source "\$here/env.sh" || return
  rm -rf /tmp/kvrt && cp -r "\$here" /tmp/kvrt
fi
source /tmp/kvrt/env.sh 2>/dev/null || true
export KVRT=/tmp/kvrt KVSPLIT_CACHE=/tmp/kvsplit
for z in /tmp/kvrt/*.bin.xz; do
  [ -f "\${z%.bin.xz}" ] || { xz -dc "\$z" > "\${z%.bin.xz}" && chmod +x "\${z%.bin.xz}"; }
done
mkdir -p /tmp/kvm \$KVSPLIT_CACHE/models \$KVSPLIT_CACHE/data/wikitext-2-raw
for d in .device/m2 .device/m3 .device/m4; do [ -d \$d ] && cp \$d/* /tmp/kvm/ 2>/dev/null; done
[ -f \$KVSPLIT_CACHE/data/wikitext-2-raw/wiki.test.raw ] || cp /tmp/kvrt/data/wiki.test.raw \$KVSPLIT_CACHE/data/wikitext-2-raw/
m=\$KVSPLIT_CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf
parts=\$(ls /tmp/kvm/part.* 2>/dev/null | sort -t. -k2 -n)
# Assembled once every part has come (their sizes add up to the model's).
if [ ! -f \$m ] && [ -n "\$parts" ] && [ "\$(cat \$parts | wc -c)" = "$(stat -c %s "$model")" ]; then
  cat \$parts > \$m.tmp
  echo "$sha  \$m.tmp" | sha256sum -c --quiet - && mv \$m.tmp \$m
fi
[ -f \$m ] && echo "gpu-env: default model ready" || echo "gpu-env: default model not (yet) assembled: make call C for real-model runs"
if [ ! -d /tmp/site/mlx_lm ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/kvrt/whl/*.whl
fi
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
ENV

tree=$(git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
size() { du -cb "$@" | tail -n 1 | cut -f1; }
p1=$(size .device/p1); p2=$(size .device/p2); rt=$(size .device/rt)
total=$(stat -c %s "$model")
m1=$((limit - tree - p1 - margin))
m2=$((limit - tree - p2 - rt - margin))
if [ $m2 -lt 0 ]; then echo "gpu-run: call B is over 64 MiB without the model ($((tree + p2 + rt)) bytes)" >&2; exit 1; fi
# What is left goes in calls C (and D) that carry nothing else.
room=$((limit - tree - margin))
m3=$((total - m1 - m2)); m4=0
if [ $m3 -gt $room ]; then m4=$((m3 - room)); m3=$room; fi
if [ $m4 -gt $room ]; then echo "gpu-run: the model needs more than four calls ($m4 bytes left for part 4)" >&2; exit 1; fi
rm -rf .device/m1 .device/m2 .device/m3 .device/m4 && mkdir -p .device/m1 .device/m2 .device/m3
dd if="$model" of=.device/m1/part.1 bs=1M iflag=count_bytes count=$m1 status=none
dd if="$model" of=.device/m2/part.2 bs=1M iflag=skip_bytes,count_bytes skip=$m1 count=$m2 status=none
dd if="$model" of=.device/m3/part.3 bs=1M iflag=skip_bytes,count_bytes skip=$((m1 + m2)) count=$m3 status=none
if [ $m4 -gt 0 ]; then
  mkdir -p .device/m4
  dd if="$model" of=.device/m4/part.4 bs=1M iflag=skip_bytes skip=$((m1 + m2 + m3)) status=none
fi
cat .device/m*/part.* | sha256sum | grep -q "^$sha " || { echo "gpu-run: model parts do not reassemble" >&2; exit 1; }
echo "gpu-run: staged; call A $((tree + p1 + m1)) bytes, B $((tree + p2 + rt + m2)), C $((tree + m3))$([ $m4 -gt 0 ] && echo ", D $((tree + m4))") (limit $limit)"
[ $m4 -gt 0 ] && echo "gpu-run: the model takes a fourth call: D run(carry=[\".device/m4\"], command=\"source /tmp/kvrt/gpu-env.sh && ...\") after C"
cat <<'CALLS'
Make these calls back to back (the machine forgets /tmp about 30 s after a call):
 A run(carry=[".device/p1", ".device/m1"], timeout_s=120,
       command="mkdir -p /tmp/mlxcuda /tmp/kvm && mv .device/p1/* /tmp/mlxcuda/ && mv .device/m1/* /tmp/kvm/")
 B run(carry=[".device/p2", ".device/rt", ".device/m2"], timeout_s=600,
       command="source .device/rt/gpu-env.sh && $KVRT/fused_check 2>&1 | tee $OUT/fused.log")
 C run(carry=[".device/m3"], timeout_s=600,
       command="source /tmp/kvrt/gpu-env.sh && $KVRT/kvsplit-mlx generate --kv 8,4 --prompt 'The capital of France is' --max-tokens 32 2>&1 | tee $OUT/generate.log")
Later calls on the warm machine: command="source /tmp/kvrt/gpu-env.sh && ...", no carry. Examples:
  $KVRT/kvsplit-mlx ppl wikitext --kv fp16,k8v8,k8v4,k4v4 --ctx 512 --max-windows 8 --out $OUT
  $KVRT/write_random_gguf llama3.1-8b /tmp/llama8b-q4_0.gguf && $KVRT/kvsplit-mlx bench --model /tmp/llama8b-q4_0.gguf ...
  $KVRT/kvsplit-mlx bench --random-model llama3.1-8b --random-weights q4 --fill random --kv fp16,k8v4 -d 4096,16384,32768 -p 128 -n 64 -r 2 --out $OUT
  python3 scripts/mlxlm-decode-bench.py --quick
First use of every kernel shape compiles it (NVRTC, seconds each; MLX's own quantized_matmul
variants take longest), so budget minutes for the first run of each command on a fresh machine
and wrap each in `timeout` with `| tee $OUT/...` so partial output comes back.
CALLS
