#!/usr/bin/env bash
# Stages the fused decode-attention check/benchmark for the lent GPU (see
# ../shared/device/README.md). It does not touch the GPU. Then make two `run` calls back to back:
#   run(carry=[".device/p1"], command="mkdir -p /tmp/mlxcuda && mv .device/p1/* /tmp/mlxcuda/")
#   run(carry=[".device/p2", ".device/rt"], timeout_s=560,
#       command="source .device/rt/env.sh && .device/rt/fused_check 2>&1 | tee $OUT/fused.log")
# fused_check exits non-zero if the fused kernel disagrees with the float64 reference.
# `--quick` limits the benchmark to 4K and 32K. Results: docs/fused-attention-h200.md.
# Only the paged decode step (`decode_step_paged`; tensor cores on and off, one launch and two):
#   command="source .device/rt/env.sh && .device/rt/fused_check --paged 2>&1 | tee $OUT/fused-paged.log"
# (`--paged --quick`: k8v4 only). `--check` runs the default paged variant; the full run none.
set -euo pipefail
root=$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel)
cd "$root"
../shared/device/stage-mlx-cuda.sh .device
target=${CARGO_TARGET_DIR:-$root/target}
cargo build --release -p mlx-kv --example fused_check
install -m 755 "$target/release/examples/fused_check" .device/rt/fused_check
du -ch .device/p2 .device/rt | tail -n 1 | sed 's/^/gpu-fused-attention: second call carries /'
