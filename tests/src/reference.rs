//! Float64 reference implementations, written from the ops' definitions and independent of
//! MLX. Inputs are the exact values MLX received (already rounded to the case's dtype), so
//! the only error left in a comparison is the backend's own arithmetic.

use half::{bf16, f16};
use mlx_rs::Dtype;

/// Rounds to the nearest value representable in `dtype` (what MLX stores).
pub fn round_to(dtype: Dtype, v: f64) -> f64 {
    match dtype {
        Dtype::Float16 => f16::from_f64(v).to_f64(),
        Dtype::Bfloat16 => bf16::from_f64(v).to_f64(),
        Dtype::Float64 => v,
        _ => v as f32 as f64,
    }
}

/// Codes of an MLX affine-packed tensor. MLX packs every bit width as one little-endian bit
/// stream: element i occupies bits [i*bits, (i+1)*bits) of the u32 words, least significant
/// first (for 3/5/6 bits codes straddle byte and word boundaries).
pub fn unpack_codes(packed: &[u32], bits: i32, count: usize) -> Vec<u32> {
    let bits = bits as usize;
    let mask = (1u64 << bits) - 1;
    (0..count)
        .map(|i| {
            let bit = i * bits;
            let (word, shift) = (bit / 32, bit % 32);
            let lo = packed[word] as u64;
            let hi = packed.get(word + 1).copied().unwrap_or(0) as u64;
            (((lo | (hi << 32)) >> shift) & mask) as u32
        })
        .collect()
}

/// w = scale * q + bias per group of `group` consecutive elements along the last axis.
pub fn dequantize(codes: &[u32], scales: &[f64], biases: &[f64], group: usize) -> Vec<f64> {
    codes
        .iter()
        .enumerate()
        .map(|(i, &q)| scales[i / group] * q as f64 + biases[i / group])
        .collect()
}

/// Row-major strides of `shape`.
fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// NumPy broadcasting of two batch shapes (right-aligned; a size-1 axis stretches).
pub fn broadcast_shapes(a: &[usize], b: &[usize]) -> Vec<usize> {
    let n = a.len().max(b.len());
    let pad = |s: &[usize]| [vec![1; n - s.len()], s.to_vec()].concat();
    let (a, b) = (pad(a), pad(b));
    a.iter().zip(&b).map(|(&x, &y)| x.max(y)).collect()
}

/// Linear batch index into an operand of batch shape `shape` for output batch index `out_idx`.
fn broadcast_offset(out_idx: &[usize], shape: &[usize]) -> usize {
    let pad = out_idx.len() - shape.len();
    let st = strides(shape);
    shape
        .iter()
        .enumerate()
        .map(|(i, &d)| if d == 1 { 0 } else { out_idx[pad + i] * st[i] })
        .sum()
}

fn unravel(mut lin: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for i in (0..shape.len()).rev() {
        idx[i] = lin % shape[i];
        lin /= shape[i];
    }
    idx
}

/// Output of a reference matmul: values and, per output, the magnitude sum_k |x_k w_k| that
/// rounding errors scale with.
pub struct MatmulRef {
    pub shape: Vec<usize>,
    pub values: Vec<f64>,
    pub magnitude: Vec<f64>,
}

/// Batched x @ w^T (`transpose`, w is [..., N, K]) or x @ w (w is [..., K, N]) with broadcast
/// batch axes: the semantics of `quantized_matmul` on the dequantized weights.
pub fn matmul(
    x: &[f64],
    x_shape: &[usize],
    w: &[f64],
    w_shape: &[usize],
    transpose: bool,
) -> MatmulRef {
    let (xr, wr) = (x_shape.len(), w_shape.len());
    let (m, k) = (x_shape[xr - 2], x_shape[xr - 1]);
    let n = if transpose {
        w_shape[wr - 2]
    } else {
        w_shape[wr - 1]
    };
    let (xb, wb) = (&x_shape[..xr - 2], &w_shape[..wr - 2]);
    let batch = broadcast_shapes(xb, wb);
    let batch_count: usize = batch.iter().product();
    let mut shape = batch.clone();
    shape.extend([m, n]);
    let mut values = Vec::with_capacity(batch_count * m * n);
    let mut magnitude = Vec::with_capacity(values.capacity());
    for bi in 0..batch_count {
        let idx = unravel(bi, &batch);
        let xo = broadcast_offset(&idx, xb) * m * k;
        let wo = broadcast_offset(&idx, wb) * n * k;
        for mi in 0..m {
            for ni in 0..n {
                let (mut acc, mut mag) = (0.0, 0.0);
                for ki in 0..k {
                    let xv = x[xo + mi * k + ki];
                    let wv = if transpose {
                        w[wo + ni * k + ki]
                    } else {
                        w[wo + ki * n + ni]
                    };
                    acc += xv * wv;
                    mag += (xv * wv).abs();
                }
                values.push(acc);
                magnitude.push(mag);
            }
        }
    }
    MatmulRef {
        shape,
        values,
        magnitude,
    }
}

/// `gather_mm` / `gather_qmm` with transposed experts: for each position of the broadcast of
/// x's batch axes with `idx`'s shape, x's `[M, K]` block times expert `idx`'s `[N, K]`
/// transposed; `w` is `[E, N, K]`. The semantics of both ops on the dequantized experts.
pub fn gather_matmul(
    x: &[f64],
    x_shape: &[usize],
    w: &[f64],
    w_shape: &[usize; 3],
    idx: &[usize],
    idx_shape: &[usize],
) -> MatmulRef {
    let xr = x_shape.len();
    let (m, k, n) = (x_shape[xr - 2], x_shape[xr - 1], w_shape[1]);
    let xb = &x_shape[..xr - 2];
    let batch = broadcast_shapes(xb, idx_shape);
    let mut shape = batch.clone();
    shape.extend([m, n]);
    let (mut values, mut magnitude) = (Vec::new(), Vec::new());
    for bi in 0..batch.iter().product() {
        let pos = unravel(bi, &batch);
        let xo = broadcast_offset(&pos, xb) * m * k;
        let wo = idx[broadcast_offset(&pos, idx_shape)] * n * k;
        for mi in 0..m {
            for ni in 0..n {
                let terms = (0..k).map(|ki| x[xo + mi * k + ki] * w[wo + ni * k + ki]);
                let (acc, mag) = terms.fold((0.0, 0.0), |(a, g), t| (a + t, g + t.abs()));
                values.push(acc);
                magnitude.push(mag);
            }
        }
    }
    MatmulRef {
        shape,
        values,
        magnitude,
    }
}

/// Attention inputs in MLX layout: q [B, H, L, D], k and v [B, Hkv, T, D].
pub struct AttnInput<'a> {
    pub q: &'a [f64],
    pub k: &'a [f64],
    pub v: &'a [f64],
    pub dims: [usize; 6], // B, H, Hkv, L, T, D
    pub scale: f64,
    pub causal: bool,
}

pub struct AttnRef {
    pub values: Vec<f64>,
    /// Per output element: sum_j p_j |v_j|.
    pub magnitude: Vec<f64>,
    /// max over (query, key) of scale * sum_d |q_d k_d|: how large logit errors can get.
    pub logit_mag: f64,
}

/// softmax(scale * q k^T + mask) v. Query head h reads KV head h / (H / Hkv) (GQA). With a
/// causal mask and L < T the queries are the last L positions: query i sees keys j <= T-L+i.
pub fn attention(a: &AttnInput) -> AttnRef {
    let [b, h, hkv, l, t, d] = a.dims;
    let rep = h / hkv;
    let mut values = vec![0.0; b * h * l * d];
    let mut magnitude = vec![0.0; values.len()];
    let mut logit_mag: f64 = 0.0;
    for bi in 0..b {
        for hi in 0..h {
            let kvh = bi * hkv + hi / rep;
            for i in 0..l {
                let qo = ((bi * h + hi) * l + i) * d;
                let visible = if a.causal { t - l + i + 1 } else { t };
                let logits: Vec<f64> = (0..visible)
                    .map(|j| {
                        let ko = (kvh * t + j) * d;
                        let (mut s, mut mag) = (0.0, 0.0);
                        for e in 0..d {
                            s += a.q[qo + e] * a.k[ko + e];
                            mag += (a.q[qo + e] * a.k[ko + e]).abs();
                        }
                        logit_mag = logit_mag.max(a.scale * mag);
                        a.scale * s
                    })
                    .collect();
                let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = logits.iter().map(|s| (s - max).exp()).collect();
                let z: f64 = e.iter().sum();
                for (j, ej) in e.iter().enumerate() {
                    let p = ej / z;
                    let vo = (kvh * t + j) * d;
                    for c in 0..d {
                        values[qo + c] += p * a.v[vo + c];
                        magnitude[qo + c] += p * a.v[vo + c].abs();
                    }
                }
            }
        }
    }
    AttnRef {
        values,
        magnitude,
        logit_mag,
    }
}

/// RoPE over x [..., L, D] (all D dims rotated, scale 1): position of row l is offset + l,
/// pair i turns by pos * base^(-2i/D). Traditional pairs are (2i, 2i+1); otherwise (i, i+D/2).
/// Returns values and, per element, |x_a| + |x_b| of its pair.
pub fn rope(
    x: &[f64],
    l: usize,
    d: usize,
    traditional: bool,
    base: f64,
    offset: usize,
) -> (Vec<f64>, Vec<f64>) {
    let mut out = vec![0.0; x.len()];
    let mut mag = vec![0.0; x.len()];
    for (row, chunk) in x.chunks(d).enumerate() {
        let pos = (offset + row % l) as f64;
        for i in 0..d / 2 {
            let theta = pos * base.powf(-2.0 * i as f64 / d as f64);
            let (ia, ib) = if traditional {
                (2 * i, 2 * i + 1)
            } else {
                (i, i + d / 2)
            };
            let (xa, xb) = (chunk[ia], chunk[ib]);
            let o = row * d;
            out[o + ia] = xa * theta.cos() - xb * theta.sin();
            out[o + ib] = xa * theta.sin() + xb * theta.cos();
            mag[o + ia] = xa.abs() + xb.abs();
            mag[o + ib] = mag[o + ia];
        }
    }
    (out, mag)
}

/// y = x * w / sqrt(mean(x^2) + eps) over the last axis.
pub fn rms_norm(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let d = w.len();
    x.chunks(d)
        .flat_map(|row| {
            let r = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / d as f64 + eps).sqrt();
            row.iter().zip(w).map(move |(v, wi)| v * r * wi)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpacks_codes_across_word_boundaries() {
        // 3-bit codes 0..=7 repeated: code 10 straddles bits 30..33 of words 0 and 1.
        let codes: Vec<u32> = (0..32).map(|i| i % 8).collect();
        let mut words = vec![0u32; 3];
        for (i, &c) in codes.iter().enumerate() {
            let bit = i * 3;
            words[bit / 32] |= c << (bit % 32);
            if bit % 32 > 29 {
                words[bit / 32 + 1] |= c >> (32 - bit % 32);
            }
        }
        assert_eq!(unpack_codes(&words, 3, 32), codes);
        assert_eq!(
            unpack_codes(&[0x8765_4321], 4, 8),
            vec![1, 2, 3, 4, 5, 6, 7, 8]
        );
    }

    #[test]
    fn causal_offset_query_sees_keys_up_to_its_position() {
        // L=1 query after T=3 keys with causal: sees all 3 keys. Values are one-hot per key and
        // logits equal, so the output is the mean of the visible keys' values.
        let (q, k) = (vec![0.0; 2], vec![0.0; 6]);
        let v = vec![1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
        let a = AttnInput {
            q: &q,
            k: &k,
            v: &v,
            dims: [1, 1, 1, 1, 3, 2],
            scale: 1.0,
            causal: true,
        };
        let o = attention(&a).values;
        assert!((o[0] - 2.0 / 3.0).abs() < 1e-15 && (o[1] - 2.0 / 3.0).abs() < 1e-15);
        // L=2 of T=3: the first query sees keys 0 and 1 only.
        let q2 = vec![0.0; 4];
        let a = AttnInput {
            q: &q2,
            dims: [1, 1, 1, 2, 3, 2],
            ..a
        };
        let o = attention(&a).values;
        assert_eq!(&o[..2], &[0.5, 0.5]);
    }

    #[test]
    fn rope_at_position_zero_is_identity_and_pairs_match_layout() {
        let x: Vec<f64> = (0..8).map(|i| i as f64).collect();
        assert_eq!(rope(&x, 1, 8, false, 10000.0, 0).0, x);
        // Pair 0 turns by pos * 1 rad: traditional rotates (x0, x1), half-split (x0, x4).
        let (t, _) = rope(&x, 1, 8, true, 10000.0, 1);
        assert!((t[0] - (0.0 * 1f64.cos() - 1.0 * 1f64.sin())).abs() < 1e-15);
        let (h, _) = rope(&x, 1, 8, false, 10000.0, 1);
        assert!((h[0] - (0.0 * 1f64.cos() - 4.0 * 1f64.sin())).abs() < 1e-15);
    }

    #[test]
    fn matmul_broadcasts_size_one_batch_axes() {
        // x [2, 1, 1] (two batches) times w [1, 1, 1] transposed: w is shared.
        let r = matmul(&[2.0, 3.0], &[2, 1, 1], &[5.0], &[1, 1, 1], true);
        assert_eq!(r.shape, vec![2, 1, 1]);
        assert_eq!(r.values, vec![10.0, 15.0]);
    }
}
