//! GGUF → family config + [`WeightMap`] under Hugging Face key names. Each family says how its
//! tensors are named and what llama.cpp's converter did to them ([`crate::model::Family`]);
//! this file reads the tensors.
//!
//! Quantized types with an MLX affine form ([`crate::gguf::affine_layouts`]) stay packed as
//! triplets where the backend's products read their layout ([`Packing`]); every other type is
//! dequantized to the compute dtype.

use crate::error::Result;
use crate::families::{llama, ArchConfig};
use crate::gguf::{affine_layouts, AffineLayout, GgmlType, GgufFile};
use crate::model::Family;
use crate::weights::{Weight, WeightMap};
use mlx_rs::{Array, Dtype};
use std::path::Path;

/// Which quantized tensors the loader keeps packed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Packing {
    /// None: every tensor dequantized (`--weights dense`).
    Dense,
    /// Q4_0, Q4_1 and Q8_0 only, whatever the backend: their triplets keep the ggml codes at
    /// their own width with f16-exact scales, so `convert` writes them unchanged.
    Native,
    /// Every type with an affine layout that the backend's products read (inference).
    Backend,
}

impl Packing {
    /// The layout `ty` is kept packed in, for rows of `cols`: the narrowest the policy allows.
    fn layout(self, ty: GgmlType, cols: usize) -> Option<AffineLayout> {
        match self {
            Packing::Dense => None,
            Packing::Native => matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0).then(|| affine_layouts(ty)[0]),
            Packing::Backend => affine_layouts(ty).iter().copied().find(|l| backend_reads(l.bits, l.group, cols)),
        }
    }
}

/// Whether the backend reads a `bits`/`group` triplet in its linear layers and embedding lookup.
/// The CPU's products run our matvec (`mlx_ext::cpu::supports`), and its embedding rows and
/// `--cpu-kernels off` MLX's dequantize, which takes 6 bits and Q6_K's group of 16 as well
/// (checked in tests/gguf_mlx.rs). The GPU's products run our qmv (4 and 8 bits) or MLX 0.32.2's
/// CUDA `quantized_matmul`, whose group sizes are 32, 64 and 128; only 4- and 8-bit triplets in
/// groups of 32 have run there, so the GPU gets Q5_x as 8 bits and keeps Q6_K dense.
fn backend_reads(bits: u32, group: usize, cols: usize) -> bool {
    match mlx_kv::Backend::current() {
        mlx_kv::Backend::Cpu => mlx_ext::cpu::supports(bits as u8, group, cols),
        mlx_kv::Backend::Gpu => matches!(bits, 4 | 8) && matches!(group, 32 | 64 | 128) && cols.is_multiple_of(group),
    }
}

fn load_tensor(g: &GgufFile, name: &str, dtype: Dtype, packing: Packing) -> Result<Weight> {
    let info = g.tensor(name)?;
    let shape: Vec<i32> = info.shape().iter().map(|&d| d as i32).collect();
    let layout = if shape.len() == 2 { packing.layout(info.ggml_type, info.row_len()) } else { None };
    if let Some(layout) = layout {
        let a = g.to_mlx_affine_as(name, layout)?;
        let (rows, cols) = (a.rows as i32, a.cols as i32);
        let w = Array::from_slice(&a.weight, &[rows, cols * a.bits as i32 / 32]);
        let groups = cols / a.group as i32;
        // The one rounding of a k-quant's scale products happens here when dtype is f16.
        let scales = Array::from_slice(&a.scales, &[rows, groups]).as_dtype(dtype)?;
        let biases = Array::from_slice(&a.biases, &[rows, groups]).as_dtype(dtype)?;
        return Ok(Weight::Quant { w, scales, biases, bits: a.bits as i32, group: a.group as i32 });
    }
    let data = g.dequantize(name)?;
    Ok(Weight::Dense(Array::from_slice(&data, &shape).as_dtype(dtype)?))
}

/// Every tensor of `g`, renamed by `hf_name` and then passed through `undo` (the family's
/// fix for what the converter did to that tensor).
fn read_tensors(
    g: &GgufFile,
    dtype: Dtype,
    packing: Packing,
    hf_name: impl Fn(&str) -> Option<String>,
    undo: impl Fn(&str, Weight) -> Result<Weight>,
) -> Result<WeightMap> {
    let mut map = WeightMap::new(g.path().to_path_buf());
    for info in g.tensors() {
        let w = load_tensor(g, &info.name, dtype, packing)?;
        match hf_name(&info.name) {
            Some(hf) => {
                let w = undo(&hf, w)?;
                map.insert(hf, w);
            }
            // Kept under its GGUF name so the strict key check reports it as unexpected.
            None => map.insert(info.name.clone(), w),
        }
    }
    Ok(map)
}

/// Opens a GGUF model of the Llama family: config plus every tensor under its HF name, with
/// Q4_0/Q4_1/Q8_0 kept as lossless MLX triplets whatever the backend (`convert` relies on it).
pub fn load(path: &Path, dtype: Dtype) -> Result<(llama::Config, WeightMap, GgufFile)> {
    let g = GgufFile::open(path)?;
    let cfg = llama::Config::from_gguf(&g)?;
    let map = read_tensors(&g, dtype, Packing::Native, llama::Config::gguf_tensor_name, |hf, w| cfg.undo_gguf_tensor(hf, w, dtype))?;
    Ok((cfg, map, g))
}

/// Opens a GGUF model of any supported family for inference: quantized weights follow
/// [`crate::weights::dense_weights_preferred`] (quantized unless `KVSPLIT_WEIGHTS=dense`).
pub fn load_any(path: &Path, dtype: Dtype) -> Result<(ArchConfig, WeightMap, GgufFile)> {
    let packing = if crate::weights::dense_weights_preferred() { Packing::Dense } else { Packing::Backend };
    load_any_with(path, dtype, packing)
}

/// Opens a GGUF model of any supported family with Q4_0/Q4_1/Q8_0 kept as lossless MLX
/// triplets whatever the backend (for `convert`).
pub fn load_any_lossless(path: &Path, dtype: Dtype) -> Result<(ArchConfig, WeightMap, GgufFile)> {
    load_any_with(path, dtype, Packing::Native)
}

fn load_any_with(path: &Path, dtype: Dtype, packing: Packing) -> Result<(ArchConfig, WeightMap, GgufFile)> {
    let g = GgufFile::open(path)?;
    let cfg = ArchConfig::from_gguf(&g)?;
    let map = read_tensors(&g, dtype, packing, |n| cfg.gguf_tensor_name(n), |hf, w| cfg.undo_gguf_tensor(hf, w, dtype))?;
    Ok((cfg, map, g))
}
