//! GGUF → family config + [`WeightMap`] under Hugging Face key names. Each family says how its
//! tensors are named and what llama.cpp's converter did to them ([`crate::model::Family`]);
//! this file reads the tensors.
//!
//! Q4_0, Q4_1 and Q8_0 become MLX affine triplets (group 32) without loss; every other type is
//! dequantized to the compute dtype.

use crate::error::Result;
use crate::families::{llama, ArchConfig};
use crate::gguf::{GgmlType, GgufFile};
use crate::model::Family;
use crate::weights::{Weight, WeightMap};
use mlx_rs::{Array, Dtype};
use std::path::Path;

/// `dense` dequantizes Q4_0/Q4_1/Q8_0 instead of keeping them as MLX triplets.
fn load_tensor(g: &GgufFile, name: &str, dtype: Dtype, dense: bool) -> Result<Weight> {
    let info = g.tensor(name)?;
    let shape: Vec<i32> = info.shape().iter().map(|&d| d as i32).collect();
    let affine = matches!(info.ggml_type, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0) && shape.len() == 2;
    if affine && !dense {
        let a = g.to_mlx_affine(name)?;
        let (rows, cols) = (a.rows as i32, a.cols as i32);
        let w = Array::from_slice(&a.weight, &[rows, cols * a.bits as i32 / 32]);
        let groups = cols / crate::gguf::MLX_GROUP_SIZE as i32;
        let scales = Array::from_slice(&a.scales, &[rows, groups]).as_dtype(dtype)?;
        let biases = Array::from_slice(&a.biases, &[rows, groups]).as_dtype(dtype)?;
        return Ok(Weight::Quant { w, scales, biases, bits: a.bits as i32, group: crate::gguf::MLX_GROUP_SIZE as i32 });
    }
    let data = g.dequantize(name)?;
    Ok(Weight::Dense(Array::from_slice(&data, &shape).as_dtype(dtype)?))
}

/// Every tensor of `g`, renamed by `hf_name` and then passed through `undo` (the family's
/// fix for what the converter did to that tensor).
fn read_tensors(
    g: &GgufFile,
    dtype: Dtype,
    dense: bool,
    hf_name: impl Fn(&str) -> Option<String>,
    undo: impl Fn(&str, Weight) -> Result<Weight>,
) -> Result<WeightMap> {
    let mut map = WeightMap::new(g.path().to_path_buf());
    for info in g.tensors() {
        let w = load_tensor(g, &info.name, dtype, dense)?;
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
    let map = read_tensors(&g, dtype, false, llama::Config::gguf_tensor_name, |hf, w| cfg.from_gguf_tensor(hf, w, dtype))?;
    Ok((cfg, map, g))
}

/// Opens a GGUF model of any supported family for inference: quantized weights follow
/// [`crate::weights::dense_weights_preferred`] (quantized unless `KVSPLIT_WEIGHTS=dense`).
pub fn load_any(path: &Path, dtype: Dtype) -> Result<(ArchConfig, WeightMap, GgufFile)> {
    load_any_with(path, dtype, crate::weights::dense_weights_preferred())
}

/// Opens a GGUF model of any supported family with Q4_0/Q4_1/Q8_0 kept as lossless MLX
/// triplets whatever the backend (for `convert`).
pub fn load_any_lossless(path: &Path, dtype: Dtype) -> Result<(ArchConfig, WeightMap, GgufFile)> {
    load_any_with(path, dtype, false)
}

/// `dense` dequantizes Q4_0/Q4_1/Q8_0 instead of keeping them as MLX triplets.
fn load_any_with(path: &Path, dtype: Dtype, dense: bool) -> Result<(ArchConfig, WeightMap, GgufFile)> {
    let g = GgufFile::open(path)?;
    let cfg = ArchConfig::from_gguf(&g)?;
    let map = read_tensors(&g, dtype, dense, |n| cfg.gguf_tensor_name(n), |hf, w| cfg.from_gguf_tensor(hf, w, dtype))?;
    Ok((cfg, map, g))
}
