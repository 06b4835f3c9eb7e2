//! Hadamard rotation (QuaRot / llama.cpp's rotated KV cache).
//!
//! An orthonormal Hadamard matrix spreads an outlier channel's energy over all channels, so
//! per-token groups see a smaller range and 4-bit keys lose less. Scores are unchanged in exact
//! arithmetic because `(qH)(kH)^T = q H H^T k^T = q k^T`.

use crate::error::{KvError, Result};
use mlx_rs::{Array, Dtype};

/// The Sylvester Hadamard matrix of order `n` (a power of two), scaled by `1/sqrt(n)` so that it
/// is orthonormal and symmetric (its own inverse).
pub fn hadamard(n: usize, dtype: Dtype) -> Result<Array> {
    if !n.is_power_of_two() {
        return Err(KvError::InvalidSpec {
            flag: "--kv-rotate",
            message: format!("Hadamard rotation needs a power-of-two head_dim, got {n}"),
        });
    }
    let scale = 1.0 / (n as f32).sqrt();
    let data: Vec<f32> = (0..n * n)
        .map(|idx| {
            let (i, j) = (idx / n, idx % n);
            // H[i][j] = (-1)^{popcount(i & j)} for the Sylvester construction.
            if (i & j).count_ones() % 2 == 0 {
                scale
            } else {
                -scale
            }
        })
        .collect();
    Ok(Array::from_slice(&data, &[n as i32, n as i32]).as_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlx_rs::ops::{abs, matmul, max};

    #[test]
    fn hadamard_is_orthonormal_and_symmetric() {
        for n in [1usize, 2, 64, 128] {
            let h = hadamard(n, Dtype::Float32).unwrap();
            let eye = mlx_rs::ops::eye::<f32>(n as i32, None, None).unwrap();
            let err = max(abs(&(matmul(&h, &h).unwrap() - &eye)).unwrap(), None).unwrap();
            assert!(err.item_cast::<f32>() < 1e-5, "n={n}: H·H deviates from I by {}", err.item_cast::<f32>());
        }
        assert!(hadamard(96, Dtype::Float32).is_err());
    }
}
