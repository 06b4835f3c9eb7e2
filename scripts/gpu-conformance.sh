#!/usr/bin/env bash
# Stages the backend conformance suite for the lent GPU (MLX CUDA backend). Run it here, from
# anywhere in the repo; it does not touch the GPU itself. Steps (shared/device/README.md):
#   1. ../shared/device/stage-mlx-cuda.sh fills the git-ignored .device/: p1/ and p2/ hold the
#      two halves of the CUDA wheel's libmlx.so.xz (65 MB compressed, over one call's 64 MiB),
#      rt/ holds the wheel's mlx_cuda_13.libs, its mlx/include tree (kernels are compiled at
#      first use against the cccl headers in it) and env.sh, which assembles everything under
#      /tmp/mlxcuda on the GPU machine and exports LD_LIBRARY_PATH (CUDA libmlx first, then the
#      wheel's libs and pip's nvidia/cu13, cudnn and nccl libs) and CUDA_HOME.
#   2. Builds `conformance` in release here (the GPU machine has no Rust) and copies it to
#      .device/rt/. It was linked against the CPU wheel's libmlx.so; its search path is a
#      RUNPATH (checked below), which the loader consults after LD_LIBRARY_PATH, so on the GPU
#      machine the CUDA libmlx.so of the same MLX version (0.32.2) is the one that loads.
#
# Then make these two `run` calls back to back (the machine forgets /tmp about 30 s after a
# call, so the second must follow the first at once):
#
#   run(carry=[".device/p1"], timeout_s=120,
#       command="mkdir -p /tmp/mlxcuda && mv .device/p1/* /tmp/mlxcuda/")
#
#   run(carry=[".device/p2", ".device/rt"], timeout_s=600,
#       command="source .device/rt/env.sh && timeout 560 .device/rt/conformance --out $OUT/conformance-cuda --ops quantized_matmul,quantize,gather_qmm,gather_mm,sdpa,rope,rms_norm,dequantize 2>&1 | tee $OUT/log")
#
# and copy the fetched files into the repo: cp <files_at>/conformance-cuda.{md,csv} docs/
#
# Every new kernel compiles on first use (about 3 s each), so the CUDA run is far slower than
# the CPU one (1-2 s). The CSV is written row by row and --ops puts the known-bug ops first, so
# a run cut off by `timeout` still returns quantized_matmul and quantize rows; the Markdown is
# only written at the end. If it was cut off, a third call while the machine is warm finishes
# the rest into a second table:
#   run(carry=[".device/rt"], timeout_s=600,
#       command="source .device/rt/env.sh && .device/rt/conformance --out $OUT/conformance-cuda-rest --ops sdpa,rope,rms_norm,dequantize 2>&1 | tee $OUT/log")
set -euo pipefail

root=$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel)
cd "$root"
target=${CARGO_TARGET_DIR:-$root/target-conf}

../shared/device/stage-mlx-cuda.sh .device

CARGO_TARGET_DIR=$target cargo build --release -p kvsplit-tests --bin conformance
bin=$target/release/conformance
# An RPATH (old dtags) would be searched before LD_LIBRARY_PATH and load the CPU libmlx.so.
if ! readelf -d "$bin" | grep -q 'RUNPATH'; then
  echo "gpu-conformance: $bin has no RUNPATH (DT_RPATH would shadow LD_LIBRARY_PATH)" >&2
  exit 1
fi
install -m 755 "$bin" .device/rt/conformance

for f in env.sh libs.tar.xz include.tar.xz conformance; do
  [ -f ".device/rt/$f" ] || { echo "gpu-conformance: .device/rt/$f missing" >&2; exit 1; }
done
du -ch .device/p2 .device/rt | tail -n 1 | sed 's/^/gpu-conformance: second call carries /'
echo "gpu-conformance: staged; make the two run calls printed at the top of $0"
