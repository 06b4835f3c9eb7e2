//! MLX's microscaled weight formats (OCP MX): `mxfp4` (e2m1 codes) and `mxfp8` (e4m3 codes),
//! each group of 32 elements sharing one power-of-two scale stored as an e8m0 byte, with no
//! bias. gpt-oss ships its experts as MXFP4, and mlx-community's gpt-oss checkpoints keep them
//! so (`"mode": "mxfp4"` in `quantization`). mlx-rs 0.33 calls MLX's quantized ops in affine
//! mode only; these go through `csrc/microscaled.cpp` to the same MLX ops with the mode set, on
//! the default stream, so every backend MLX has runs them.

use crate::ffi;
use crate::{ExtError, Result};
use mlx_rs::Array;
use std::ffi::CStr;

/// One microscaled format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MxFormat {
    Mxfp4,
    Mxfp8,
}

impl MxFormat {
    /// Elements per scale in both formats.
    pub const GROUP: i32 = 32;

    /// The format of an MLX quantization `mode`; `None` for `affine` and modes we do not run
    /// (`nvfp4` needs a global scale per tensor).
    pub fn from_mode(mode: &str) -> Option<MxFormat> {
        match mode {
            "mxfp4" => Some(MxFormat::Mxfp4),
            "mxfp8" => Some(MxFormat::Mxfp8),
            _ => None,
        }
    }

    pub fn mode(self) -> &'static str {
        match self {
            MxFormat::Mxfp4 => "mxfp4",
            MxFormat::Mxfp8 => "mxfp8",
        }
    }

    fn c_mode(self) -> &'static CStr {
        match self {
            MxFormat::Mxfp4 => c"mxfp4",
            MxFormat::Mxfp8 => c"mxfp8",
        }
    }

    pub fn bits(self) -> i32 {
        match self {
            MxFormat::Mxfp4 => 4,
            MxFormat::Mxfp8 => 8,
        }
    }
}

fn none() -> mlx_sys::mlx_array {
    mlx_sys::mlx_array { ctx: std::ptr::null_mut() }
}

fn call(what: &str, f: impl FnOnce(&mut mlx_sys::mlx_array) -> i32) -> Result<Array> {
    ffi::array_from(what, f)
}

/// `x W^T` (`transpose`) or `x W` for `W` packed in `format` (`w` u32 `[N, K*bits/32]`, `scales`
/// u8 `[N, K/32]`).
pub fn quantized_matmul(x: &Array, w: &Array, scales: &Array, format: MxFormat, transpose: bool) -> Result<Array> {
    call(&format!("{} quantized_matmul", format.mode()), |out| unsafe {
        ffi::kvsplit_mode_quantized_matmul(out, x.as_ptr(), w.as_ptr(), scales.as_ptr(), none(), transpose, MxFormat::GROUP, format.bits(), format.c_mode().as_ptr())
    })
}

/// MLX's `gather_qmm` over stacked matrices in `format` (`w` `[E, N, K*bits/32]`): for each
/// row of `x`, the product with the matrix `rhs_indices` selects.
pub fn gather_qmm(x: &Array, w: &Array, scales: &Array, rhs_indices: &Array, format: MxFormat, transpose: bool, sorted: bool) -> Result<Array> {
    call(&format!("{} gather_qmm", format.mode()), |out| unsafe {
        ffi::kvsplit_mode_gather_qmm(
            out,
            x.as_ptr(),
            w.as_ptr(),
            scales.as_ptr(),
            none(),
            none(),
            rhs_indices.as_ptr(),
            transpose,
            MxFormat::GROUP,
            format.bits(),
            format.c_mode().as_ptr(),
            sorted,
        )
    })
}

/// The values `w` and `scales` encode, in the float type MLX picks; callers cast to their
/// compute dtype.
pub fn dequantize(w: &Array, scales: &Array, format: MxFormat) -> Result<Array> {
    call(&format!("{} dequantize", format.mode()), |out| unsafe {
        ffi::kvsplit_mode_dequantize(out, w.as_ptr(), scales.as_ptr(), none(), MxFormat::GROUP, format.bits(), format.c_mode().as_ptr())
    })
}

/// `w` (`[..., K]`, K a multiple of 32) packed in `format`: codes and scales.
pub fn quantize(w: &Array, format: MxFormat) -> Result<(Array, Array)> {
    unsafe {
        let mut codes = mlx_sys::mlx_array_new();
        let mut scales = mlx_sys::mlx_array_new();
        if ffi::kvsplit_mode_quantize(&mut codes, &mut scales, w.as_ptr(), MxFormat::GROUP, format.bits(), format.c_mode().as_ptr()) != 0 {
            mlx_sys::mlx_array_free(codes);
            mlx_sys::mlx_array_free(scales);
            return Err(ExtError::Primitive(format!("{} quantize: {}", format.mode(), ffi::last_error())));
        }
        Ok((Array::from_ptr(codes), Array::from_ptr(scales)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlx_rs::ops::{abs, matmul};
    use mlx_rs::ops::indexing::IndexOp;
    use mlx_rs::Dtype;

    /// OCP MX e2m1 magnitudes; every code times the group's power of two.
    const E2M1: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

    fn to_vec(a: &Array) -> Vec<f32> {
        a.as_dtype(Dtype::Float32).unwrap().as_slice::<f32>().to_vec()
    }

    /// Rows of groups of 32 whose values lie on the e2m1 grid times 2^k, each group holding a
    /// 6 * 2^k (so its shared exponent is k and nothing rounds): quantize must give back every
    /// value exactly, and the product must be the float product of the decoded weight.
    #[test]
    fn mxfp4_grid_values_round_trip_and_products_match_the_decoded_weight() {
        let (n, k) = (6usize, 96usize);
        let vals: Vec<f32> = (0..n * k)
            .map(|i| {
                let (row, col) = (i / k, i % k);
                let scale = 2f32.powi((row + col / 32) as i32 % 5 - 2);
                let code = if col % 32 == 0 { 7 } else { (row * 5 + col * 3) % 8 };
                let sign = if (row + col) % 3 == 0 { -1.0 } else { 1.0 };
                sign * E2M1[code] * scale
            })
            .collect();
        let w = Array::from_slice(&vals, &[n as i32, k as i32]);
        let (codes, scales) = quantize(&w, MxFormat::Mxfp4).unwrap();
        assert_eq!((codes.dtype(), scales.dtype()), (Dtype::Uint32, Dtype::Uint8));
        assert_eq!((codes.shape(), scales.shape()), (&[n as i32, (k / 8) as i32][..], &[n as i32, (k / 32) as i32][..]));
        let back = to_vec(&dequantize(&codes, &scales, MxFormat::Mxfp4).unwrap());
        assert_eq!(back, vals, "grid values must come back exactly");
        // f32 products: each output sums k terms, so it may differ from the reference's order
        // of summation by about k * 2^-24 * sum |x w|.
        let x: Vec<f32> = (0..3 * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
        let x = Array::from_slice(&x, &[3, k as i32]);
        let got = to_vec(&quantized_matmul(&x, &codes, &scales, MxFormat::Mxfp4, true).unwrap());
        let want = to_vec(&matmul(&x, w.t()).unwrap());
        let bound = to_vec(&matmul(abs(&x).unwrap(), abs(&w).unwrap().t()).unwrap());
        for ((g, r), b) in got.iter().zip(&want).zip(&bound) {
            assert!((g - r).abs() <= k as f32 * f32::EPSILON * b, "{g} vs {r} (bound {})", k as f32 * f32::EPSILON * b);
        }
    }

    /// gather_qmm with a mode picks each row's expert: the same as that expert's own product.
    #[test]
    fn gathered_experts_equal_their_own_products() {
        let (e, n, k) = (3i32, 4i32, 64i32);
        let w: Vec<f32> = (0..e * n * k).map(|i| ((i * 29 % 61) as f32 - 30.0) / 7.0).collect();
        let w = Array::from_slice(&w, &[e, n, k]);
        for format in [MxFormat::Mxfp4, MxFormat::Mxfp8] {
            let (codes, scales) = quantize(&w, format).unwrap();
            let x: Vec<f32> = (0..2 * k).map(|i| ((i * 13 % 17) as f32 - 8.0) / 4.0).collect();
            let x = Array::from_slice(&x, &[2, 1, k]);
            let idx = Array::from_slice(&[2u32, 0], &[2]);
            let got = to_vec(&gather_qmm(&x, &codes, &scales, &idx, format, true, false).unwrap());
            for (row, expert) in [(0, 2), (1, 0)] {
                let xr = x.index(row);
                let own = to_vec(&quantized_matmul(&xr, &codes.index(expert), &scales.index(expert), format, true).unwrap());
                assert_eq!(&got[row as usize * n as usize..(row as usize + 1) * n as usize], &own[..], "{format:?} row {row}");
            }
        }
    }

    #[test]
    fn a_wrong_scale_shape_is_an_error_naming_the_mode() {
        let (codes, _) = quantize(&Array::ones::<f32>(&[4, 64]).unwrap(), MxFormat::Mxfp4).unwrap();
        let bad = Array::ones::<u8>(&[4, 3]).unwrap();
        let e = quantized_matmul(&Array::ones::<f32>(&[1, 64]).unwrap(), &codes, &bad, MxFormat::Mxfp4, true).unwrap_err().to_string();
        assert!(e.starts_with("mxfp4 quantized_matmul:"), "{e}");
    }
}
