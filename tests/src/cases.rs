//! The conformance cases: which ops, shapes, dtypes and bit widths the suite covers, and
//! the table row each case fills.

use mlx_rs::Dtype;

use crate::report::CaseResult;

/// One conformance case. Each produces one table row.
#[derive(Debug, Clone, PartialEq)]
pub enum Case {
    /// dequantize(quantize(x)) against x. `transposed`: x is a transposed view of contiguous
    /// data (column-major), not a copy.
    Quantize {
        dtype: Dtype,
        bits: i32,
        group: i32,
        transposed: bool,
    },
    /// MLX's dequantize of a triplet against a float64 dequantize of the same triplet.
    Dequantize {
        dtype: Dtype,
        bits: i32,
        group: i32,
    },
    /// quantized_matmul of x with a triplet MLX produced, against x times its f64 dequant.
    Qmm {
        dtype: Dtype,
        bits: i32,
        group: i32,
        transpose: bool,
        rank: usize,
    },
    /// gather_qmm of x with stacked experts MLX quantized, each row routed to the expert its
    /// index names, against x times that expert's f64 dequant. `sorted`: pairs sorted by
    /// expert, one row each (mlx-lm's prefill layout); otherwise tokens x top-k (decode).
    GatherQmm {
        dtype: Dtype,
        bits: i32,
        sorted: bool,
    },
    /// gather_mm of x with a transposed view of stacked dense experts, as the engine calls it.
    GatherMm {
        dtype: Dtype,
        sorted: bool,
    },
    Sdpa {
        dtype: Dtype,
        heads: usize,
        kv_heads: usize,
        l: usize,
        t: usize,
        d: usize,
        causal: bool,
    },
    Rope {
        dtype: Dtype,
        traditional: bool,
        offset: usize,
    },
    RmsNorm {
        dtype: Dtype,
        d: usize,
    },
}

const QUANT_BITS: [i32; 6] = [2, 3, 4, 5, 6, 8];
const GROUPS: [i32; 3] = [32, 64, 128];
const QMM_BITS: [i32; 3] = [2, 4, 8];
const RANKS: [usize; 4] = [2, 3, 4, 5];

/// Every case of the suite, in table order.
pub fn all_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for dtype in [Dtype::Float32, Dtype::Float16, Dtype::Bfloat16] {
        for bits in QUANT_BITS {
            for group in GROUPS {
                for transposed in [false, true] {
                    cases.push(Case::Quantize {
                        dtype,
                        bits,
                        group,
                        transposed,
                    });
                }
                cases.push(Case::Dequantize { dtype, bits, group });
            }
        }
    }
    for dtype in [Dtype::Float32, Dtype::Float16] {
        for bits in QMM_BITS {
            for transpose in [true, false] {
                for rank in RANKS {
                    cases.push(Case::Qmm {
                        dtype,
                        bits,
                        group: 64,
                        transpose,
                        rank,
                    });
                }
            }
        }
    }
    for dtype in [Dtype::Float32, Dtype::Float16] {
        for sorted in [false, true] {
            for bits in QMM_BITS {
                cases.push(Case::GatherQmm { dtype, bits, sorted });
            }
            cases.push(Case::GatherMm { dtype, sorted });
        }
    }
    for dtype in [Dtype::Float32, Dtype::Float16] {
        // (heads, kv_heads, L, T, causal): full self-attention, prefill, a prefill chunk after
        // cached tokens (L < T, mask aligned to the end) and one decode step, each MHA and GQA.
        for (l, t, causal) in [(9, 9, false), (12, 12, true), (4, 21, true), (1, 33, false)] {
            for (heads, kv_heads) in [(4, 4), (8, 2)] {
                cases.push(Case::Sdpa {
                    dtype,
                    heads,
                    kv_heads,
                    l,
                    t,
                    d: 64,
                    causal,
                });
            }
        }
        for traditional in [false, true] {
            for offset in [0, 37] {
                cases.push(Case::Rope {
                    dtype,
                    traditional,
                    offset,
                });
            }
        }
        for d in [64, 576] {
            cases.push(Case::RmsNorm { dtype, d });
        }
    }
    cases
}

/// Quantize input size: 8 rows of 256 (2 to 8 groups per row).
pub(crate) const Q_ROWS: usize = 8;
pub(crate) const Q_COLS: usize = 256;

/// [B, H, L, D] with L and D as in a small model's prefill chunk.
pub(crate) const ROPE_SHAPE: [usize; 4] = [1, 3, 7, 64];
pub(crate) const ROPE_BASE: f64 = 10000.0;

pub fn dtype_name(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::Float16 => "f16",
        Dtype::Bfloat16 => "bf16",
        Dtype::Float64 => "f64",
        _ => "f32",
    }
}

pub(crate) fn fmt_shape(shape: &[usize]) -> String {
    let s: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("[{}]", s.join(","))
}

/// (x shape, logical w shape) for quantized_matmul at each rank, laid out as the engine's
/// attention uses them: transpose = scores q.k^T (K = head dim D), no transpose = p.V (K = T).
/// Weights are grouped along their last axis (D = 128, two groups of 64).
pub fn qmm_shapes(rank: usize, transpose: bool) -> (Vec<usize>, Vec<usize>) {
    let (d, t) = (128, 24);
    let (x, w): (Vec<usize>, Vec<usize>) = match rank {
        2 => (vec![4], vec![]),
        3 => (vec![2, 6], vec![2]),       // [Hkv, rep*L, .] x [Hkv, T, D]
        4 => (vec![1, 4, 3], vec![1, 4]), // [B, H, L, .] x [B, H, T, D]
        _ => (vec![1, 2, 2, 3], vec![1, 2, 1]), // [B, Hkv, rep, L, .] x [B, Hkv, 1, T, D]
    };
    let rows = if rank == 2 { 32 } else { t };
    if transpose {
        ([x, vec![d]].concat(), [w, vec![rows, d]].concat())
    } else {
        ([x, vec![rows]].concat(), [w, vec![rows, d]].concat())
    }
}

/// Stacked experts of the gather cases: `[E, N, K]`, K two groups of 64.
pub const GATHER_EXPERTS: [usize; 3] = [4, 32, 128];

/// (x shape, index shape) of the gather cases: 3 tokens x top-2 against `x[B, L, 1, 1, K]` as
/// mlx-lm's SwitchGLU expands it, or 12 pairs sorted by expert, one `[1, K]` row each.
pub fn gather_shapes(sorted: bool) -> (Vec<usize>, Vec<usize>) {
    let k = GATHER_EXPERTS[2];
    if sorted {
        (vec![12, 1, k], vec![12])
    } else {
        (vec![1, 3, 1, 1, k], vec![1, 3, 2])
    }
}

/// The op name a case's row carries (for filtering cases before running them).
pub fn case_op(case: &Case) -> &'static str {
    describe(case).op
}

/// The row metadata of a case, before it runs.
pub(crate) fn describe(case: &Case) -> CaseResult {
    let mut row = CaseResult {
        op: "",
        shape_class: String::new(),
        dtype: "",
        bits: None,
        group: None,
        transpose: None,
        rank: 2,
        row_major: true,
        shape: String::new(),
        max_rel_err: f64::INFINITY,
        tolerance_name: "",
        tolerance: f64::NAN,
        pass: false,
        error: None,
    };
    let q_shape = format!("x{}", fmt_shape(&[Q_ROWS, Q_COLS]));
    match *case {
        Case::Quantize {
            dtype,
            bits,
            group,
            transposed,
        } => {
            row.op = "quantize";
            row.shape_class = if transposed {
                "transposed input"
            } else {
                "row-major"
            }
            .into();
            (row.dtype, row.bits, row.group, row.row_major) =
                (dtype_name(dtype), Some(bits), Some(group), !transposed);
            row.shape = q_shape;
        }
        Case::Dequantize { dtype, bits, group } => {
            row.op = "dequantize";
            row.shape_class = "row-major".into();
            (row.dtype, row.bits, row.group) = (dtype_name(dtype), Some(bits), Some(group));
            row.shape = q_shape;
        }
        Case::Qmm {
            dtype,
            bits,
            group,
            transpose,
            rank,
        } => {
            let (x, w) = qmm_shapes(rank, transpose);
            row.op = "quantized_matmul";
            row.shape_class = match rank {
                5 => "5-D gqa".to_string(),
                r => format!("{r}-D"),
            };
            (row.dtype, row.bits, row.group, row.transpose, row.rank) = (
                dtype_name(dtype),
                Some(bits),
                Some(group),
                Some(transpose),
                rank,
            );
            row.shape = format!("x{} w{}", fmt_shape(&x), fmt_shape(&w));
        }
        Case::GatherQmm { dtype, sorted, .. } | Case::GatherMm { dtype, sorted } => {
            let (x, idx) = gather_shapes(sorted);
            row.shape_class = if sorted { "sorted pairs" } else { "tokens x top-k" }.into();
            (row.dtype, row.rank, row.transpose) = (dtype_name(dtype), x.len(), Some(true));
            row.shape = format!("x{} w{} idx{}", fmt_shape(&x), fmt_shape(&GATHER_EXPERTS), fmt_shape(&idx));
            row.op = "gather_mm";
            if let Case::GatherQmm { bits, .. } = *case {
                (row.op, row.bits, row.group) = ("gather_qmm", Some(bits), Some(64));
            }
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
            row.op = "sdpa";
            let mask = match (causal, l < t) {
                (false, _) if l == 1 => "decode no mask",
                (false, _) => "no mask",
                (true, false) => "causal",
                (true, true) => "causal offset",
            };
            let gqa = if heads == kv_heads { "" } else { " gqa" };
            row.shape_class = format!("{mask}{gqa}");
            (row.dtype, row.rank) = (dtype_name(dtype), 4);
            row.shape = format!(
                "q{} kv{}",
                fmt_shape(&[1, heads, l, d]),
                fmt_shape(&[1, kv_heads, t, d])
            );
        }
        Case::Rope {
            dtype,
            traditional,
            offset,
        } => {
            row.op = "rope";
            let style = if traditional {
                "traditional"
            } else {
                "half-split"
            };
            row.shape_class = format!("{style}, offset {offset}");
            (row.dtype, row.rank) = (dtype_name(dtype), 4);
            row.shape = format!("x{}", fmt_shape(&ROPE_SHAPE));
        }
        Case::RmsNorm { dtype, d } => {
            row.op = "rms_norm";
            row.shape_class = format!("D={d}");
            row.dtype = dtype_name(dtype);
            row.shape = format!("x{} w[{d}]", fmt_shape(&[6, d]));
        }
    }
    row
}
