//! Running the conformance cases: the inputs each op gets, how MLX is called, and how its
//! output is scored against the float64 reference.
//!
//! Scoring is uniform: every case produces `got` (MLX), `want` (reference) and `norm` (per
//! element, the magnitude that the op's rounding errors scale with), and its metric is
//! max |got - want| / norm. Normalising by the magnitude instead of |want| keeps cancellation
//! (a dot product near zero) from inflating a correct result's error, so the tolerances can be
//! plain multiples of the unit roundoff.

use mlx_rs::fast::{self, ScaledDotProductAttentionMask};
use mlx_rs::ops::{dequantize, gather_mm, gather_qmm, quantize, quantized_matmul};
use mlx_rs::{Array, Dtype};
use rand::{rngs::StdRng, Rng, SeedableRng};

pub use crate::cases::{all_cases, case_op, dtype_name, gather_shapes, qmm_shapes, Case};
use crate::cases::{describe, GATHER_EXPERTS, Q_COLS, Q_ROWS, ROPE_BASE, ROPE_SHAPE};
use crate::reference::{self as r, round_to};
use crate::report::CaseResult;
use crate::tolerance::{self, Tolerance};

/// A deliberate corruption of a case's result, to prove the checker can fail.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Tamper {
    None,
    /// Moves the first output by this many tolerances (in the metric's units).
    ShiftFirst(f64),
    /// Reverses the output order, like a backend mixing up batch or head indices.
    Reverse,
    /// Flips the top bit of the first packed code (quantize / dequantize cases only; on other
    /// cases it does nothing), like a backend packing codes wrongly.
    FlipFirstCode,
}

/// Runs every case of [`all_cases`] on the current default device.
pub fn run_suite() -> Vec<CaseResult> {
    run_cases(&all_cases(), Tamper::None, |_| {})
}

/// Runs `cases`, calling `progress` after each (so a caller can stream rows out).
pub fn run_cases(
    cases: &[Case],
    tamper: Tamper,
    mut progress: impl FnMut(&CaseResult),
) -> Vec<CaseResult> {
    cases
        .iter()
        .map(|c| {
            let res = run_case(c, tamper);
            progress(&res);
            res
        })
        .collect()
}

/// What a case measured, before scoring.
struct Measured {
    got: Vec<f64>,
    want: Vec<f64>,
    norm: Vec<f64>,
    tol: Tolerance,
}

type Res<T> = Result<T, String>;

fn err<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// max_i |got_i - want_i| / norm_i; infinite for NaN or a length mismatch so neither can pass.
pub fn score(got: &[f64], want: &[f64], norm: &[f64]) -> f64 {
    if got.len() != want.len() || want.len() != norm.len() || got.is_empty() {
        return f64::INFINITY;
    }
    got.iter()
        .zip(want)
        .zip(norm)
        .map(|((g, w), n)| {
            let e = (g - w).abs() / n.max(f64::MIN_POSITIVE);
            if e.is_nan() {
                f64::INFINITY
            } else {
                e
            }
        })
        .fold(0.0, f64::max)
}

/// Runs one case and scores it; MLX exceptions become a failing row with the message.
pub fn run_case(case: &Case, tamper: Tamper) -> CaseResult {
    let mut row = describe(case);
    match measure(case, tamper) {
        Ok(mut m) => {
            match tamper {
                Tamper::ShiftFirst(k) if !m.got.is_empty() => {
                    m.got[0] += k * m.tol.value * m.norm[0]
                }
                Tamper::Reverse => m.got.reverse(),
                _ => {}
            }
            row.max_rel_err = score(&m.got, &m.want, &m.norm);
            row.tolerance_name = m.tol.name;
            row.tolerance = m.tol.value;
            row.pass = row.max_rel_err <= m.tol.value;
        }
        Err(e) => row.error = Some(e),
    }
    row
}

/// A deterministic RNG per case, so adding cases leaves the others' data unchanged.
fn rng_for(case: &Case) -> StdRng {
    let key = format!("{case:?}");
    let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    StdRng::seed_from_u64(hash)
}

/// Standard normal samples (Box-Muller), rounded to `dtype` so MLX stores them exactly.
fn normal(rng: &mut StdRng, n: usize, dtype: Dtype) -> Vec<f64> {
    (0..n)
        .map(|_| {
            let (u1, u2): (f64, f64) = (1.0 - rng.gen::<f64>(), rng.gen());
            round_to(
                dtype,
                (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos(),
            )
        })
        .collect()
}

fn dims(shape: &[usize]) -> Vec<i32> {
    shape.iter().map(|&d| d as i32).collect()
}

/// An MLX array of `dtype` holding `vals` exactly (they are already representable in it).
fn array(vals: &[f64], shape: &[usize], dtype: Dtype) -> Res<Array> {
    let f: Vec<f32> = vals.iter().map(|&v| v as f32).collect();
    Array::from_slice(&f, &dims(shape))
        .as_dtype(dtype)
        .map_err(err)
}

fn read(a: &Array) -> Res<Vec<f64>> {
    let f = a
        .as_dtype(Dtype::Float32)
        .and_then(|a| a.contiguous())
        .map_err(err)?;
    Ok(f.to_vec_exact::<f32>()
        .map_err(err)?
        .into_iter()
        .map(f64::from)
        .collect())
}

/// A triplet read back from MLX.
struct Triplet {
    packed: Array,
    scales: Array,
    biases: Array,
    codes: Vec<u32>,
    s: Vec<f64>,
    b: Vec<f64>,
}

fn quantize_read(w: &Array, count: usize, group: i32, bits: i32) -> Res<Triplet> {
    let (packed, scales, biases) = quantize(w, group, bits).map_err(err)?;
    let words = packed
        .contiguous()
        .map_err(err)?
        .to_vec_exact::<u32>()
        .map_err(err)?;
    if words.len() * 32 != count * bits as usize {
        return Err(format!(
            "quantize returned {} words for {count} {bits}-bit codes",
            words.len()
        ));
    }
    let codes = r::unpack_codes(&words, bits, count);
    let (s, b) = (read(&scales)?, read(&biases)?);
    let groups = count / group as usize;
    if s.len() != groups || b.len() != groups {
        return Err(format!(
            "quantize returned {} scales and {} biases for {groups} groups",
            s.len(),
            b.len()
        ));
    }
    Ok(Triplet {
        packed,
        scales,
        biases,
        codes,
        s,
        b,
    })
}

fn flip_first(codes: &mut [u32], bits: i32, tamper: Tamper) {
    if tamper == Tamper::FlipFirstCode {
        codes[0] ^= 1 << (bits - 1);
    }
}

/// Quantize input: rows of standard normals, with rows that exercise MLX's edge rules: an
/// all-positive and an all-negative row (the grid's other branch), a constant group and an
/// all-zero group (the step falls back to its 1e-7 floor).
fn quant_input(rng: &mut StdRng, dtype: Dtype) -> Vec<f64> {
    let mut x = normal(rng, Q_ROWS * Q_COLS, dtype);
    for (i, v) in x.iter_mut().enumerate() {
        let (row, col) = (i / Q_COLS, i % Q_COLS);
        *v = match row {
            2 => round_to(dtype, *v + 5.0),
            3 => round_to(dtype, *v - 5.0),
            7 if col < Q_COLS / 2 => round_to(dtype, 0.75),
            7 => 0.0,
            _ => *v,
        };
    }
    x
}

fn measure(case: &Case, tamper: Tamper) -> Res<Measured> {
    let mut rng = rng_for(case);
    match *case {
        Case::Quantize {
            dtype,
            bits,
            group,
            transposed,
        } => {
            let x = quant_input(&mut rng, dtype);
            let w = if transposed {
                // Contiguous [C, R] data whose transpose is the logical [R, C] input.
                let t: Vec<f64> = (0..Q_COLS * Q_ROWS)
                    .map(|i| x[(i % Q_ROWS) * Q_COLS + i / Q_ROWS])
                    .collect();
                let view = array(&t, &[Q_COLS, Q_ROWS], dtype)?
                    .transpose()
                    .map_err(err)?;
                view.eval().map_err(err)?;
                if view.strides() != [1, Q_ROWS] {
                    return Err(format!(
                        "transposed input was materialized: strides {:?}",
                        view.strides()
                    ));
                }
                view
            } else {
                array(&x, &[Q_ROWS, Q_COLS], dtype)?
            };
            let mut tr = quantize_read(&w, x.len(), group, bits)?;
            flip_first(&mut tr.codes, bits, tamper);
            let g = group as usize;
            let n = ((1u32 << bits) - 1) as f64;
            let got = r::dequantize(&tr.codes, &tr.s, &tr.b, g);
            let norm = (0..x.len())
                .map(|i| {
                    let (s, b) = (tr.s[i / g], tr.b[i / g]);
                    let (lo, hi) = (b.min(b + n * s), b.max(b + n * s));
                    let clip = (lo - x[i]).max(x[i] - hi).max(0.0);
                    tolerance::quant_element_bound(dtype, bits, x[i], s, b, tr.codes[i], clip)
                })
                .collect();
            Ok(Measured {
                got,
                want: x,
                norm,
                tol: tolerance::quant_nearest(),
            })
        }
        Case::Dequantize { dtype, bits, group } => {
            let x = quant_input(&mut rng, dtype);
            let mut tr =
                quantize_read(&array(&x, &[Q_ROWS, Q_COLS], dtype)?, x.len(), group, bits)?;
            let got =
                read(&dequantize(&tr.packed, &tr.scales, &tr.biases, group, bits).map_err(err)?)?;
            flip_first(&mut tr.codes, bits, tamper);
            let g = group as usize;
            let want = r::dequantize(&tr.codes, &tr.s, &tr.b, g);
            let norm = (0..x.len())
                .map(|i| (tr.s[i / g] * tr.codes[i] as f64).abs() + tr.b[i / g].abs())
                .collect();
            Ok(Measured {
                got,
                want,
                norm,
                tol: tolerance::dequant(dtype),
            })
        }
        Case::Qmm {
            dtype,
            bits,
            group,
            transpose,
            rank,
        } => {
            let (x_shape, w_shape) = qmm_shapes(rank, transpose);
            let x: Vec<f64> = normal(&mut rng, x_shape.iter().product(), dtype);
            let w: Vec<f64> = normal(&mut rng, w_shape.iter().product(), dtype);
            let tr = quantize_read(&array(&w, &w_shape, dtype)?, w.len(), group, bits)?;
            let wd = r::dequantize(&tr.codes, &tr.s, &tr.b, group as usize);
            let xa = array(&x, &x_shape, dtype)?;
            let out = quantized_matmul(
                &xa, &tr.packed, &tr.scales, &tr.biases, transpose, group, bits,
            )
            .map_err(err)?;
            let reference = r::matmul(&x, &x_shape, &wd, &w_shape, transpose);
            let got_shape: Vec<usize> = out.shape().iter().map(|&d| d as usize).collect();
            if got_shape != reference.shape {
                return Err(format!(
                    "output shape {got_shape:?}, expected {:?}",
                    reference.shape
                ));
            }
            let k = x_shape[x_shape.len() - 1];
            Ok(Measured {
                got: read(&out)?,
                want: reference.values,
                norm: reference.magnitude,
                tol: tolerance::qmm(dtype, k),
            })
        }
        Case::GatherQmm { dtype, sorted, .. } | Case::GatherMm { dtype, sorted } => {
            let (x_shape, idx_shape) = gather_shapes(sorted);
            let ws = GATHER_EXPERTS;
            let x = normal(&mut rng, x_shape.iter().product(), dtype);
            let w = normal(&mut rng, ws.iter().product(), dtype);
            let mut idx: Vec<usize> = (0..idx_shape.iter().product::<usize>())
                .map(|_| rng.gen_range(0..ws[0]))
                .collect();
            if sorted {
                idx.sort_unstable();
            }
            let idx_i32: Vec<i32> = idx.iter().map(|&e| e as i32).collect();
            let ia = Array::from_slice(&idx_i32, &dims(&idx_shape));
            let (xa, wa) = (array(&x, &x_shape, dtype)?, array(&w, &ws, dtype)?);
            let (out, wd, tol) = match *case {
                Case::GatherQmm { bits, .. } => {
                    let tr = quantize_read(&wa, w.len(), 64, bits)?;
                    let out = gather_qmm(
                        &xa, &tr.packed, &tr.scales, &tr.biases, None, &ia, true, 64, bits,
                        sorted,
                    );
                    let wd = r::dequantize(&tr.codes, &tr.s, &tr.b, 64);
                    (out, wd, tolerance::qmm(dtype, ws[2]))
                }
                _ => {
                    let wt = wa.swap_axes(-1, -2).map_err(err)?;
                    (gather_mm(&xa, &wt, None, &ia, sorted), w, tolerance::mm(dtype, ws[2]))
                }
            };
            let out = out.map_err(err)?;
            let reference = r::gather_matmul(&x, &x_shape, &wd, &ws, &idx, &idx_shape);
            let got_shape: Vec<usize> = out.shape().iter().map(|&d| d as usize).collect();
            if got_shape != reference.shape {
                return Err(format!(
                    "output shape {got_shape:?}, expected {:?}",
                    reference.shape
                ));
            }
            Ok(Measured {
                got: read(&out)?,
                want: reference.values,
                norm: reference.magnitude,
                tol,
            })
        }
        Case::Sdpa {
            dtype,
            heads,
            kv_heads,
            l,
            t,
            d,
            causal,
        } => {
            let (qs, kvs) = ([1, heads, l, d], [1, kv_heads, t, d]);
            let q = normal(&mut rng, qs.iter().product(), dtype);
            let k = normal(&mut rng, kvs.iter().product(), dtype);
            let v = normal(&mut rng, kvs.iter().product(), dtype);
            // MLX takes the scale as f32; the reference uses the same f32 value.
            let scale = (1.0 / (d as f64).sqrt()) as f32;
            let mask = causal.then_some(ScaledDotProductAttentionMask::Causal);
            let out = fast::scaled_dot_product_attention(
                array(&q, &qs, dtype)?,
                array(&k, &kvs, dtype)?,
                array(&v, &kvs, dtype)?,
                scale,
                mask,
                None,
            )
            .map_err(err)?;
            let a = r::AttnInput {
                q: &q,
                k: &k,
                v: &v,
                dims: [1, heads, kv_heads, l, t, d],
                scale: scale as f64,
                causal,
            };
            let reference = r::attention(&a);
            let tol = tolerance::sdpa(dtype, d, t, reference.logit_mag);
            Ok(Measured {
                got: read(&out)?,
                want: reference.values,
                norm: reference.magnitude,
                tol,
            })
        }
        Case::Rope {
            dtype,
            traditional,
            offset,
        } => {
            let shape = ROPE_SHAPE;
            let (l, d) = (shape[2], shape[3]);
            let x = normal(&mut rng, shape.iter().product(), dtype);
            let out = fast::rope(
                array(&x, &shape, dtype)?,
                d as i32,
                traditional,
                ROPE_BASE as f32,
                1.0,
                offset as i32,
                None,
            )
            .map_err(err)?;
            let (want, norm) = r::rope(&x, l, d, traditional, ROPE_BASE, offset);
            let theta_max = (offset + l - 1) as f64;
            Ok(Measured {
                got: read(&out)?,
                want,
                norm,
                tol: tolerance::rope(dtype, theta_max),
            })
        }
        Case::RmsNorm { dtype, d } => {
            let rows = 6;
            let x = normal(&mut rng, rows * d, dtype);
            // Weights near 1 like a trained norm, but not exactly 1, so the product is tested.
            let w: Vec<f64> = normal(&mut rng, d, dtype)
                .iter()
                .map(|v| round_to(dtype, 1.0 + 0.25 * v))
                .collect();
            let eps = 1e-5f32;
            let out = fast::rms_norm(
                array(&x, &[rows, d], dtype)?,
                Some(&array(&w, &[d], dtype)?),
                eps,
            )
            .map_err(err)?;
            let want = r::rms_norm(&x, &w, eps as f64);
            let norm = want.iter().map(|v| v.abs()).collect();
            Ok(Measured {
                got: read(&out)?,
                want,
                norm,
                tol: tolerance::rms_norm(dtype, d),
            })
        }
    }
}
