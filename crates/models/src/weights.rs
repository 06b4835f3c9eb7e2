//! Loaded tensors keyed by checkpoint (Hugging Face) names, and the layers built from them.
//!
//! Loading is strict: a model lists the keys it expects, and [`WeightMap::check`] reports every
//! missing and every unexpected key at once, naming the file.

use crate::error::{ModelError, Result};
use mlx_rs::ops::indexing::IndexOp;
use mlx_rs::ops::{dequantize, matmul, quantized_matmul};
use mlx_ext::microscaled::{self, MxFormat};
use mlx_rs::{Array, Dtype};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Whether quantized weights are dequantized to the compute dtype at load instead of kept as
/// MLX affine triplets (`--weights dense|quantized` of the engine options; quantized by default
/// on every backend). On the CPU, decode-sized products run our own quantized matvec primitive
/// (`mlx_ext::cpu`) and larger ones dequantize one matrix at a time for BLAS
/// ([`Linear::forward`]); MLX 0.32.2's own CPU `quantized_matmul` (scalar code) is never used
/// there. Dense remains for measuring the difference.
pub fn dense_weights_preferred() -> bool {
    mlx_ext::options::current().weights == mlx_ext::WeightMode::Dense
}

/// Rows of `x` up to which the CPU uses the quantized matvec; beyond it, dequantize + BLAS
/// (`--cpu-matvec-rows`).
fn cpu_matvec_max_rows() -> i32 {
    mlx_ext::options::current().cpu_matvec_rows as i32
}

/// One checkpoint tensor: plain, an MLX affine triplet (`w` packed `u32`), or microscaled codes
/// with their e8m0 scales (`mode: mxfp4|mxfp8`; gpt-oss's experts).
pub enum Weight {
    Dense(Array),
    Quant { w: Array, scales: Array, biases: Array, bits: i32, group: i32 },
    Mx { w: Array, scales: Array, format: MxFormat },
}

impl Weight {
    /// Logical (unpacked) shape.
    pub fn shape(&self) -> Vec<usize> {
        match self {
            Weight::Dense(a) => a.shape().iter().map(|&d| d as usize).collect(),
            Weight::Quant { w, bits, .. } => unpacked_shape(w, *bits),
            Weight::Mx { w, format, .. } => unpacked_shape(w, format.bits()),
        }
    }

    pub fn to_dense(&self, dtype: Dtype) -> Result<Array> {
        Ok(match self {
            Weight::Dense(a) => a.as_dtype(dtype)?,
            Weight::Quant { w, scales, biases, bits, group } => {
                dequantize(w, scales, biases, *group, *bits)?.as_dtype(dtype)?
            }
            Weight::Mx { w, scales, format } => microscaled::dequantize(w, scales, *format)?.as_dtype(dtype)?,
        })
    }

    pub fn arrays(&self) -> Vec<&Array> {
        match self {
            Weight::Dense(a) => vec![a],
            Weight::Quant { w, scales, biases, .. } => vec![w, scales, biases],
            Weight::Mx { w, scales, .. } => vec![w, scales],
        }
    }

    /// Whether the codes stay packed (affine or microscaled).
    pub fn is_packed(&self) -> bool {
        !matches!(self, Weight::Dense(_))
    }
}

fn unpacked_shape(w: &Array, bits: i32) -> Vec<usize> {
    let mut s: Vec<usize> = w.shape().iter().map(|&d| d as usize).collect();
    let last = s.len() - 1;
    s[last] = s[last] * 32 / bits as usize;
    s
}

/// All tensors of a checkpoint, by name.
pub struct WeightMap {
    pub source: PathBuf,
    tensors: BTreeMap<String, Weight>,
}

impl WeightMap {
    pub fn new(source: PathBuf) -> Self {
        WeightMap { source, tensors: BTreeMap::new() }
    }

    pub fn insert(&mut self, name: String, w: Weight) {
        self.tensors.insert(name, w);
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Replaces every tensor by `f(name, tensor)`.
    pub fn map(&mut self, mut f: impl FnMut(&str, Weight) -> Result<Weight>) -> Result<()> {
        let tensors = std::mem::take(&mut self.tensors);
        for (name, w) in tensors {
            let w = f(&name, w)?;
            self.tensors.insert(name, w);
        }
        Ok(())
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    /// Fails listing every expected key that is absent and every present key not expected.
    pub fn check(&self, expected: &[String]) -> Result<()> {
        let missing: Vec<String> = expected.iter().filter(|k| !self.tensors.contains_key(*k)).cloned().collect();
        let unexpected: Vec<String> = self.tensors.keys().filter(|k| !expected.contains(k)).cloned().collect();
        if missing.is_empty() && unexpected.is_empty() {
            return Ok(());
        }
        Err(ModelError::Keys { path: self.source.clone(), missing, unexpected })
    }

    pub fn take(&mut self, name: &str) -> Result<Weight> {
        self.tensors.remove(name).ok_or_else(|| ModelError::Keys {
            path: self.source.clone(),
            missing: vec![name.to_string()],
            unexpected: vec![],
        })
    }

    /// Takes a tensor and checks its logical shape.
    pub fn take_shaped(&mut self, name: &str, want: &[usize]) -> Result<Weight> {
        let w = self.take(name)?;
        let got = w.shape();
        if got != want {
            return Err(ModelError::Shape { path: self.source.clone(), tensor: name.into(), got, want: want.to_vec() });
        }
        Ok(w)
    }

    /// Replaces every quantized tensor by its dequantized values in `dtype`.
    pub fn dequantize_all(&mut self, dtype: Dtype) -> Result<()> {
        for w in self.tensors.values_mut() {
            if w.is_packed() {
                *w = Weight::Dense(w.to_dense(dtype)?);
            }
        }
        Ok(())
    }

    pub fn take_dense(&mut self, name: &str, dtype: Dtype) -> Result<Array> {
        self.take(name)?.to_dense(dtype)
    }
}

/// `y = x W^T (+ b)`, with W dense or quantized; quantized weights are never dequantized.
pub struct Linear {
    pub weight: Weight,
    pub bias: Option<Array>,
}

impl Linear {
    /// The weight's arrays (packed codes, scales and biases when quantized) and the bias.
    pub fn arrays(&self) -> Vec<&Array> {
        let mut v = self.weight.arrays();
        v.extend(self.bias.iter());
        v
    }

    pub fn forward(&self, x: &Array) -> Result<Array> {
        // One row per sequence (`[B, 1, K]`, a batched decode step) as `[1, B, K]`: MLX's CUDA
        // quantized matmul treats leading axes as a batch of separate products, each reading
        // the whole weight, so B sequences cost B weight passes; as rows of one product the
        // weight is read once.
        let sh = x.shape();
        if sh.len() == 3 && sh[1] == 1 && sh[0] > 1 {
            let y = self.forward(&x.reshape(&[1, sh[0], sh[2]])?)?;
            let n = *y.shape().last().expect("linear output has a feature axis");
            return Ok(y.reshape(&[sh[0], 1, n])?);
        }
        let y = match &self.weight {
            Weight::Dense(w) => matmul(x, w.t())?,
            Weight::Quant { w, scales, biases, bits, group } => {
                if mlx_kv::Backend::current() == mlx_kv::Backend::Cpu {
                    cpu_quantized(x, w, scales, biases, *bits, *group)?
                } else {
                    gpu_quantized(x, w, scales, biases, *bits, *group)?
                }
            }
            Weight::Mx { w, scales, format } => {
                if mlx_kv::Backend::current() == mlx_kv::Backend::Cpu && *format == MxFormat::Mxfp4 && mlx_ext::cpu::enabled() && w.ndim() == 2 {
                    cpu_mxfp4(x, w, scales)?
                } else {
                    microscaled::quantized_matmul(x, w, scales, *format, true)?
                }
            }
        };
        Ok(match &self.bias {
            Some(b) => y + b,
            None => y,
        })
    }
}

/// Rows a GPU quantized product is padded to when it has more than one and fewer than this:
/// MLX 0.32.2's CUDA `quantized_matmul` takes its one-row kernel only for one row, and its tiled
/// kernel ran 2-7 rows slower than 8 (H100, 14336 x 4096 at 4 bits: 137 us at 4 rows, 41 us at 8;
/// `scripts/gpu-qmm-rows.py`), so a batched decode step of 4 sequences would cost more per
/// sequence than one of 8.
const GPU_MIN_ROWS: i32 = 8;

fn gpu_quantized(x: &Array, w: &Array, scales: &Array, biases: &Array, bits: i32, group: i32) -> Result<Array> {
    let sh = x.shape();
    let k = *sh.last().expect("linear input has a feature axis");
    let rows = x.size() as i32 / k.max(1);
    // Decode steps (one row per sequence, up to 8) on our matvec where `--gpu-matvec` says so:
    // it reads the weight once for every row, at a higher fraction of bandwidth than MLX's
    // kernels, for a little more host time per launch.
    if mlx_ext::qmv::covers(bits, group, k, rows) && w.ndim() == 2 && mlx_ext::qmv::wanted(w.nbytes() + scales.nbytes() + biases.nbytes()) {
        return Ok(mlx_ext::qmv::qmv(x, w, scales, biases, bits, group)?);
    }
    if rows <= 1 || rows >= GPU_MIN_ROWS {
        return Ok(quantized_matmul(x, w, scales, biases, true, group, bits)?);
    }
    let pad = mlx_rs::ops::zeros_dtype(&[GPU_MIN_ROWS - rows, k], x.dtype())?;
    let padded = mlx_rs::ops::concatenate(&[x.reshape(&[rows, k])?, pad], 0)?;
    let y = quantized_matmul(&padded, w, scales, biases, true, group, bits)?;
    let n = *y.shape().last().expect("linear output has a feature axis");
    let mut out_shape = sh[..sh.len() - 1].to_vec();
    out_shape.push(n);
    Ok(y.index((0..rows, ..)).reshape(&out_shape)?)
}

fn cpu_quantized(x: &Array, w: &Array, scales: &Array, biases: &Array, bits: i32, group: i32) -> Result<Array> {
    let k = *x.shape().last().expect("linear input has a feature axis");
    let rows = x.size() as i32 / k.max(1);
    let ours = mlx_ext::cpu::enabled() && mlx_ext::cpu::supports(bits as u8, group as usize, k as usize);
    if ours && rows <= cpu_matvec_max_rows() {
        return Ok(mlx_ext::cpu::quantized_matvec(x, w, scales, biases, group, bits)?.as_dtype(x.dtype())?);
    }
    if ours {
        // Many rows: our dequantization, then BLAS. MLX's CPU dequantize took twice as long as
        // the matmul it fed at 64 rows.
        let dense = mlx_ext::cpu::dequantize(w, scales, biases, group, bits)?.as_dtype(x.dtype())?;
        return Ok(matmul(x, dense.t())?);
    }
    let dense = dequantize(w, &scales.as_dtype(x.dtype())?, &biases.as_dtype(x.dtype())?, group, bits)?;
    Ok(matmul(x, dense.t())?)
}

/// MXFP4 on the CPU through our primitives, as [`cpu_quantized`] does for affine weights: MLX's
/// CPU kernel for the mode is scalar code (see `mlx_ext::cpu::mxfp4_matvec`).
fn cpu_mxfp4(x: &Array, w: &Array, scales: &Array) -> Result<Array> {
    let k = *x.shape().last().expect("linear input has a feature axis");
    let rows = x.size() as i32 / k.max(1);
    if rows <= cpu_matvec_max_rows() {
        return Ok(mlx_ext::cpu::mxfp4_matvec(x, w, scales)?.as_dtype(x.dtype())?);
    }
    let dense = mlx_ext::cpu::mxfp4_dequantize(w, scales)?.as_dtype(x.dtype())?;
    Ok(matmul(x, dense.t())?)
}

/// Token embedding; also the output head when embeddings are tied.
pub struct Embedding {
    pub weight: Weight,
}

impl Embedding {
    /// Rows for `ids` (`[B, L]` int32) → `[B, L, H]`; quantized tables dequantize only those rows.
    pub fn forward(&self, ids: &Array, dtype: Dtype) -> Result<Array> {
        let sh = ids.shape().to_vec();
        let flat = ids.reshape(&[-1])?;
        let rows = match &self.weight {
            Weight::Dense(w) => w.index(&flat).as_dtype(dtype)?,
            Weight::Quant { w, scales, biases, bits, group } => dequantize(
                w.index(&flat),
                scales.index(&flat),
                &biases.index(&flat),
                *group,
                *bits,
            )?
            .as_dtype(dtype)?,
            Weight::Mx { w, scales, format } => {
                microscaled::dequantize(&w.index(&flat), &scales.index(&flat), *format)?.as_dtype(dtype)?
            }
        };
        let h = rows.shape()[1];
        Ok(rows.reshape(&[sh[0], sh[1], h])?)
    }

    /// Logits against the embedding table (tied output head).
    pub fn as_linear(&self, x: &Array) -> Result<Array> {
        Linear { weight: clone_weight(&self.weight), bias: None }.forward(x)
    }
}

fn clone_weight(w: &Weight) -> Weight {
    match w {
        Weight::Dense(a) => Weight::Dense(a.clone()),
        Weight::Quant { w, scales, biases, bits, group } => Weight::Quant {
            w: w.clone(),
            scales: scales.clone(),
            biases: biases.clone(),
            bits: *bits,
            group: *group,
        },
        Weight::Mx { w, scales, format } => Weight::Mx { w: w.clone(), scales: scales.clone(), format: *format },
    }
}

/// What every decoder-only family does after its layer stack: keep only the last position when
/// asked (generation needs no other logits), apply the final RMSNorm, then the output head, which
/// is the embedding table itself when embeddings are tied.
pub fn output_logits(x: Array, norm: &Array, eps: f32, lm_head: Option<&Linear>, embed: &Embedding, last_only: bool) -> Result<Array> {
    let x = if last_only {
        let l = x.shape()[1];
        x.index((.., l - 1..l, ..))
    } else {
        x
    };
    let x = crate::fast::rms_norm(&x, Some(norm), eps)?;
    match lm_head {
        Some(head) => head.forward(&x),
        None => embed.as_linear(&x),
    }
}
