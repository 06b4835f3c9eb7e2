//! Named error bounds, each derived from the dtype's unit roundoff and the op's arithmetic.
//!
//! Every metric in the suite is "error divided by the magnitude that rounding errors scale
//! with" (see `conformance::score`), so each bound below is a multiple of a unit roundoff `u`
//! (half the machine epsilon: the largest relative error of one round-to-nearest). None of the
//! constants here were adjusted after looking at measured errors.

use mlx_rs::Dtype;

/// Unit roundoff of one rounding to `dtype`: 2^-(p) for a p-bit significand (with hidden bit).
pub fn unit_roundoff(dtype: Dtype) -> f64 {
    match dtype {
        Dtype::Float16 => 2f64.powi(-11),
        Dtype::Bfloat16 => 2f64.powi(-8),
        Dtype::Float64 => 2f64.powi(-53),
        _ => 2f64.powi(-24),
    }
}

/// Kernels compute scales, angles and softmax in float32 whatever the storage dtype.
pub fn u_f32() -> f64 {
    unit_roundoff(Dtype::Float32)
}

/// Confidence parameter of the probabilistic rounding-error bound of Higham & Mary (SIAM J.
/// Sci. Comput. 2019): an n-term inner product computed with independent round-to-nearest
/// errors satisfies |err| <= lambda * sqrt(n) * u * sum|x_i*y_i| with probability at least
/// 1 - 2n exp(-lambda^2/2). lambda = 6 makes that at least 1 - 5e-6 for n <= 150 per output.
/// The deterministic bound (n * u) would be 2-10x looser at our sizes and would hide real
/// kernel defects behind it.
pub const LAMBDA: f64 = 6.0;

/// A bound with the name that the table shows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    pub name: &'static str,
    pub value: f64,
}

/// Quantize round trip, measured as the ratio err / allowed_error(element) (see
/// [`quant_element_bound`]); a ratio above 1 means some element left its bound.
pub fn quant_nearest() -> Tolerance {
    Tolerance {
        name: "QUANT_NEAREST_STEP",
        value: 1.0,
    }
}

/// Error allowed for one element x after quantize + exact dequantize, given the stored
/// (dtype-rounded) scale `s`, bias `b`, chosen code `q`, bits, and `clip`, the distance by which
/// x lies outside the stored grid's range [b, b + (2^bits - 1)*s].
///
/// - |s|/2: rounding to the nearest grid point.
/// - clip (capped at one step): MLX 0.32 snaps the grid so that the larger-magnitude edge of the
///   group is exact and zero is a grid point (`s = edge / rint(edge / s0)`). That can shrink the
///   step and leave the far edge of the group outside the grid, by at most
///   n*|s0 - s| = n*|q0 - edge/s0|/|edge/s0| * |s| <= (n/2)/(n/2) * |s| = |s|, since the larger
///   edge satisfies |edge| >= n*s0/2. A clip beyond one step is therefore a defect.
/// - 2u_T(q|s| + |b|): MLX picks q on the float32 grid, then stores s and b rounded to the
///   dtype, which moves grid point q by up to u_T(q|s| + |b|); counted for both grids.
/// - 8u_f32(|x| + |b| + n|s|): the float32 subtraction and division that pick q.
pub fn quant_element_bound(
    dtype: Dtype,
    bits: i32,
    x: f64,
    s: f64,
    b: f64,
    q: u32,
    clip: f64,
) -> f64 {
    let n = ((1u32 << bits) - 1) as f64;
    let ut = unit_roundoff(dtype);
    0.5 * s.abs()
        + clip.min(s.abs())
        + 2.0 * ut * (q as f64 * s.abs() + b.abs())
        + 8.0 * u_f32() * (x.abs() + b.abs() + n * s.abs())
}

/// Dequantize: w = s*q + b with s, b exact dtype values. At most two roundings to the dtype
/// (product, sum; a fused or float32 evaluation rounds once). Metric: err / (|s*q| + |b|).
pub fn dequant(dtype: Dtype) -> Tolerance {
    Tolerance {
        name: "DEQUANT_2U",
        value: 2.0 * unit_roundoff(dtype),
    }
}

/// Quantized matmul, one output = K-term dot product of x with s*q + b. Each term sees up to
/// three dtype roundings (s*q, +b, *x) before the K-term sum, so n = K + 3 in the
/// probabilistic bound, plus one rounding of the output. Metric: err / sum_k |x_k * w_k|.
pub fn qmm(dtype: Dtype, k: usize) -> Tolerance {
    let u = unit_roundoff(dtype);
    Tolerance {
        name: "QMM_PROB_SQRT_K",
        value: LAMBDA * ((k + 3) as f64).sqrt() * u + u,
    }
}

/// Dense matmul, one output = K-term dot product: one rounding per product before the sum
/// (n = K + 1), plus one rounding of the output. Metric: err / sum_k |x_k * w_k|.
pub fn mm(dtype: Dtype, k: usize) -> Tolerance {
    let u = unit_roundoff(dtype);
    Tolerance {
        name: "MM_PROB_SQRT_K",
        value: LAMBDA * ((k + 1) as f64).sqrt() * u + u,
    }
}

/// Attention o = sum_j p_j v_j, p = softmax(scale * q.k). Metric: err / sum_j p_j |v_j|.
/// - A logit error d_j changes p_j by a factor exp(d_j - weighted mean of d) <= exp(2 max|d|),
///   so the output moves by at most 2 max|d| * sum p|v| (first order). Each logit is a D-term
///   dot product plus the scaling of q (n = D + 3): |d| <= lambda sqrt(D+3) u * logit_mag,
///   where logit_mag = max scale * sum_d |q_d k_d| is measured on the inputs.
/// - p rounded to the dtype, the T-term weighted sum (n = T + 3), and the output rounding.
/// - Softmax in float32: exp, max-subtraction and the normalising sum (n = T terms).
pub fn sdpa(dtype: Dtype, d: usize, t: usize, logit_mag: f64) -> Tolerance {
    let u = unit_roundoff(dtype);
    let logits = 2.0 * LAMBDA * ((d + 3) as f64).sqrt() * u * logit_mag;
    let weighted_sum = LAMBDA * ((t + 3) as f64).sqrt() * u + u;
    let softmax = (LAMBDA * (t as f64).sqrt() + 4.0) * u_f32();
    Tolerance {
        name: "SDPA_PROB_LOGITS_SQRT_D_T",
        value: logits + weighted_sum + softmax,
    }
}

/// RoPE: out = x_a cos(theta) -/+ x_b sin(theta), theta = pos * base^(-2i/D) in float32.
/// Metric: err / (|x_a| + |x_b|).
/// - The frequency (a power via exp/log) is off by a few u_f32 relative, and pos * freq by one
///   more: the angle is off by <= 4 u_f32 * theta_max; cos/sin add 2 u_f32 each.
/// - Two products and one sum rounded to the dtype: 3 u_T.
pub fn rope(dtype: Dtype, theta_max: f64) -> Tolerance {
    Tolerance {
        name: "ROPE_PHASE_4U32_THETA",
        value: 3.0 * unit_roundoff(dtype) + (4.0 * theta_max + 4.0) * u_f32(),
    }
}

/// RMS norm: y = x * w / sqrt(mean(x^2) + eps). Metric: plain relative error |err| / |y| (a
/// product of factors, no cancellation).
/// - Sum of D squares in float32 (positive terms): lambda sqrt(D) u_f32, halved by the square
///   root, plus rsqrt and the mean's division: 4 u_f32.
/// - x * r and * w rounded to the dtype, plus the output: 3 u_T.
pub fn rms_norm(dtype: Dtype, d: usize) -> Tolerance {
    Tolerance {
        name: "RMSNORM_REL",
        value: 3.0 * unit_roundoff(dtype) + (0.5 * LAMBDA * (d as f64).sqrt() + 4.0) * u_f32(),
    }
}
