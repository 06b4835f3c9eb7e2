#!/usr/bin/env bash
# Stages the whole-model decode comparison (#7: K8V4 vs fp16 cache) for the lent GPU, without
# the real model: the kvsplit-mlx binary, fused_check and the MLX CUDA runtime, plus a run
# script, under the git-ignored .device/ of the checkout the `run` tool sends (default: this
# one; set KVSPLIT_DEVICE_ROOT when working from a worktree). Prints the two calls to make.
#
# What the run script does on the GPU machine (about 4 minutes on a fresh machine):
#   1. fused_check --quick: kernel checks against float64 with poisoned outputs, the fused
#      decode step's new-token codes against MLX's quantize, per-layer timings;
#   2. bench --random-model llama3.1-8b --random-weights q4 --fill random --kv fp16,k8v4,
#      depths 4K-128K, 64 decode steps, 5 repeats (rows interleaved);
#   3. ncu: the attention kernel's GPU time inside the model at 32K and 128K, per setting.
# MLX compiles kernels on first use; the compiled PTX comes back as ptx.tgz: copy it to
# .device/gbm/ptx.tgz and later runs skip most of the compilation.
#
# Usage: scripts/gpu-bench-model.sh        (builds with $CARGO_TARGET_DIR, default target/)
set -euo pipefail
src=$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel)
root=${KVSPLIT_DEVICE_ROOT:-$src}
target=${CARGO_TARGET_DIR:-$src/target}
cd "$src"
"$src/scripts/setup.sh"
CARGO_TARGET_DIR=$target cargo build --release -q -p kvsplit-mlx
CARGO_TARGET_DIR=$target cargo build --release -q -p mlx-kv --example fused_check
cd "$root"
"$src/../shared/device/stage-mlx-cuda.sh" .device >/dev/null
out=.device/gbm
mkdir -p $out
cp .device/rt/env.sh .device/rt/libs.tar.xz .device/rt/include.tar.xz $out/
for b in "$target/release/kvsplit-mlx" "$target/release/examples/fused_check"; do
  # An RPATH (old dtags) would be searched before LD_LIBRARY_PATH and load the CPU libmlx.so.
  readelf -d "$b" | grep -q RUNPATH || { echo "gpu-bench-model: $b has no RUNPATH" >&2; exit 1; }
  strip -o "$out/$(basename "$b")" "$b"
done
cat > $out/run.sh <<'EOF'
#!/usr/bin/env bash
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/env.sh" || exit 3
export MLX_PTX_CACHE_DIR=/tmp/mlxptx; mkdir -p $MLX_PTX_CACHE_DIR /tmp/o
[ -f "$here/ptx.tgz" ] && tar -C /tmp -xzf "$here/ptx.tgz"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv 2>&1 | tee $OUT/gpu.txt
timeout 200 "$here/fused_check" --quick 2>&1 | tee $OUT/fused.log
A="bench --random-model llama3.1-8b --random-weights q4 --fill random -p 1"
timeout 200 "$here/kvsplit-mlx" $A --kv fp16,k8v4 -n 64 -r 5 -d 4096,32768,65536,131072 --out /tmp/o/bench 2>&1 | tee $OUT/bench.log
N="ncu --clock-control none --cache-control none -k regex:cudnn|kvsplit|sdpa --launch-skip 400 --launch-count 24 --metrics gpu__time_duration.sum,dram__bytes_read.sum --print-summary per-kernel"
for cfg in "fp16 32768" "k8v4 32768" "fp16 131072" "k8v4 131072"; do set -- $cfg
  echo "== ncu $1 depth $2"
  timeout 100 $N "$here/kvsplit-mlx" $A --kv $1 -n 16 -r 1 -d $2 --out /tmp/o/ncu 2>&1 | grep -vE "^==PROF== Profiling" | tail -32
done 2>&1 | tee $OUT/ncu.log
tar -C /tmp -czf $OUT/bench.tgz o/bench; tar -C /tmp -czf $OUT/ptx.tgz mlxptx
EOF
chmod +x $out/run.sh
echo "gpu-bench-model: staged $(du -sh $out | cut -f1) in $root/$out"
cat <<'CALLS'
Make these calls back to back (the machine forgets /tmp about 30 s after a call):
 A run(carry=[".device/p1"], timeout_s=120, command="mkdir -p /tmp/mlxcuda && mv .device/p1/* /tmp/mlxcuda/")
 B run(carry=[".device/p2", ".device/gbm"], timeout_s=600, command="bash .device/gbm/run.sh")
CALLS
