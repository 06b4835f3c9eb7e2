//! `y = x W^T` on CUDA for decode-sized `x` (1 to 8 rows: one per sequence of a decode step)
//! and a weight in MLX's affine layout (4- or 8-bit codes, one scale and bias per group), as our
//! own kernel (`kernels/qmv.cu`) instead of MLX's `quantized_matmul`.
//!
//! A decode step of a 4-bit 8B model reads about 4.2 GB of weights; MLX 0.32.2's one-row kernel
//! streamed them at about 0.9 TB/s in our step (ncu, docs/gpu-whole-model-h200.md), while a
//! plain warp-per-row kernel over the same layout reached 1.2-2.0 TB/s on an H100
//! (`scripts/gpu-qmv-probe.py`). Several rows share each weight load, where MLX's kernel takes
//! one row only and its tiled kernel needs 8 to run well (`models::weights`).

use crate::cuda_kernel::{run_kernel, KernelDef, Out};
use crate::options::{GpuMatvec, QMV_MIN_BYTES};
use crate::{ExtError, Result};
use mlx_rs::Array;

const QMV_DEF: KernelDef = KernelDef {
    stem: "kvsplit_qmv",
    header: include_str!("kernels/qmv_common.cuh"),
    defines: "",
    body: include_str!("kernels/qmv.cu"),
    inputs: &["x", "w", "scales", "biases"],
    outputs: &["y"],
};

/// Threads per block: eight warps, one weight row each.
const THREADS: i32 = 256;

/// Whether [`qmv`] covers `rows` rows of `k` features against a weight of `bits` and `group`:
/// 4 or 8 bits, each lane's 16-byte load (128 / bits codes) inside one group, and at most 8
/// rows (more take MLX's tiled kernel, which reads the weight once for them too).
pub fn covers(bits: i32, group: i32, k: i32, rows: i32) -> bool {
    let per_load = match bits {
        4 | 8 => 128 / bits,
        _ => return false,
    };
    group > 0 && group % per_load == 0 && k % group == 0 && (1..=8).contains(&rows)
}

/// Whether `--gpu-matvec` gives a weight of `bytes` (packed codes, scales and biases) to
/// [`qmv`], on a build with CUDA kernels (not macOS, whose GPU is Metal). The caller checks
/// [`covers`] and that the GPU is the default device.
pub fn wanted(bytes: usize) -> bool {
    if cfg!(target_os = "macos") {
        return false;
    }
    match crate::options::current().gpu_matvec {
        GpuMatvec::On => true,
        GpuMatvec::Off => false,
        GpuMatvec::Auto => bytes >= QMV_MIN_BYTES,
    }
}

/// `x W^T` for `x` `[..., K]` (at most 8 rows in all) and `w` `[N, K * bits / 32]` packed as
/// MLX packs it, with `scales` and `biases` `[N, K / group]`; the result is `[..., N]` in `x`'s
/// dtype, summed in f32. The caller checks [`covers`] and that the backend is CUDA.
pub fn qmv(x: &Array, w: &Array, scales: &Array, biases: &Array, bits: i32, group: i32) -> Result<Array> {
    let sh = x.shape();
    let k = *sh.last().ok_or_else(|| ExtError::Primitive("qmv: x has no feature axis".into()))?;
    let rows = if k == 0 { 0 } else { x.size() as i32 / k };
    let ws = w.shape();
    if !covers(bits, group, k, rows) || ws.len() != 2 || ws[1] * 32 / bits != k || scales.shape() != [ws[0], k / group] || biases.shape() != scales.shape() {
        return Err(ExtError::Primitive(format!(
            "qmv: x {sh:?} against a {bits}-bit weight {ws:?} in groups of {group} (scales {:?}): not a covered shape",
            scales.shape()
        )));
    }
    let n = ws[0];
    let x2 = x.reshape(&[rows, k])?;
    let threads = (n * 32 + THREADS - 1) / THREADS * THREADS;
    let y = run_kernel(
        &QMV_DEF,
        "",
        &[&x2, w, scales, biases],
        &[Out { shape: &[rows, n], dtype: x.dtype() }],
        (threads, 1),
        THREADS,
        // Two row variants only (the kernel reads the count from x's shape): a variant per
        // count met its NVRTC compile inside requests (every new prompt length up to 8 and
        // every batch size).
        &[("BITS", bits), ("GROUP", group), ("K", k), ("N", n), ("R", if rows == 1 { 1 } else { 8 })],
        // Both dtypes in the kernel's name: MLX caches compiled kernels by name.
        &[("OT", x.dtype()), ("ST", scales.dtype())],
    )?;
    let mut out = sh[..sh.len() - 1].to_vec();
    out.push(n);
    Ok(y.into_iter().next().expect("qmv has one output").reshape(&out)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covered_shapes_keep_each_load_inside_one_group() {
        assert!(covers(4, 32, 4096, 1) && covers(4, 64, 14336, 8) && covers(8, 32, 576, 1) && covers(8, 16, 64, 3));
        assert!(!covers(4, 16, 4096, 1), "a 16-byte load holds 32 four-bit codes");
        assert!(!covers(3, 64, 4096, 1) && !covers(6, 64, 4096, 1) && !covers(2, 64, 4096, 1));
        assert!(!covers(4, 64, 4096, 9) && !covers(4, 64, 4096, 0));
        assert!(!covers(4, 64, 4000, 1), "whole groups per row");
    }

    #[test]
    fn auto_gives_our_kernel_the_large_weights_only() {
        // The default options (this test process installs none).
        assert_eq!(crate::options::current().gpu_matvec, GpuMatvec::Auto);
        if cfg!(not(target_os = "macos")) {
            assert!(wanted(QMV_MIN_BYTES) && wanted(64 << 20));
            assert!(!wanted(QMV_MIN_BYTES - 1) && !wanted(600 << 10), "SmolLM2-sized weights stay on MLX's kernel");
        }
    }

    #[test]
    fn the_source_names_the_row_count_as_its_one_shape_parameter() {
        // MLX passes x's shape only because the source names it; the weight sizes are template
        // arguments.
        let (_, body) = crate::cuda_kernel::include_files(&QMV_DEF, QMV_DEF.body, 7).expect("temp dir is writable");
        assert!(body.starts_with("// uses: x_shape\n"), "{body}");
    }
}
