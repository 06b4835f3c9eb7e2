//! GGUF model files: a validating reader over a memory map, metadata lookups, tensor byte ranges,
//! dequantization to f32 and conversion of the 4/5/8-bit block types and the k-quants Q4_K/Q5_K/Q6_K
//! to MLX affine triplets.
//!
//! Shapes: GGUF stores ggml dims `ne[0..n]` with `ne[0]` the fastest-varying (contiguous) axis,
//! the reverse of the row-major convention of MLX/NumPy. [`TensorInfo::ggml_shape`] keeps the file
//! order and [`TensorInfo::shape`] gives the row-major one, so a `token_embd.weight` with ggml
//! shape `[576, 49152]` is a `[49152, 576]` matrix, rows of 576 contiguous values.

mod encode;
mod error;
mod mlx;
mod quants;
mod reader;
mod types;
mod value;
mod writer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub use error::{DequantError, GgufError, Result};
pub use mlx::{affine_layouts, to_mlx_affine, to_mlx_affine_as, AffineLayout, MlxAffine};
pub use quants::dequantize;
pub use reader::DEFAULT_ALIGNMENT;
pub use types::{GgmlType, TensorInfo, QK_K};
pub use value::{MetaArray, MetaValue};
pub use encode::{put_str, put_value, quantize_block_q4_0, quantize_q4_0, type_id, value_type, Q4_0_BLOCK, Q4_0_BYTES};
pub use writer::{GgufWriter, TensorSpec};

enum Storage {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mmap(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// An opened, validated GGUF file. Tensor data stays in the memory map until asked for.
pub struct GgufFile {
    path: PathBuf,
    data: Storage,
    version: u32,
    metadata: Vec<(String, MetaValue)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Memory-maps and validates `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let io = |source| GgufError::Io { path: path.clone(), source };
        let file = std::fs::File::open(&path).map_err(io)?;
        // SAFETY: the map is read-only; like every mmap reader we assume the file is not
        // truncated by another process while it is open.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Self::from_storage(path, Storage::Mmap(map))
    }

    /// Parses an in-memory GGUF image; `name` stands in for the path in error messages.
    pub fn from_bytes(name: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<Self> {
        Self::from_storage(name.into(), Storage::Owned(bytes))
    }

    fn from_storage(path: PathBuf, data: Storage) -> Result<Self> {
        let p = reader::parse(data.bytes(), &path)?;
        let meta_index = p.metadata.iter().enumerate().map(|(i, (k, _))| (k.clone(), i)).collect();
        let tensor_index = p.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(Self {
            path,
            data,
            version: p.version,
            metadata: p.metadata,
            meta_index,
            tensors: p.tensors,
            tensor_index,
            alignment: p.alignment,
            data_offset: p.data_offset,
        })
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// GGUF format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Alignment of tensor data (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute file offset where the tensor data section begins.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// All metadata pairs in file order.
    pub fn metadata(&self) -> impl Iterator<Item = (&str, &MetaValue)> {
        self.metadata.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// A metadata value, if present.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    fn require(&self, key: &str) -> Result<&MetaValue> {
        self.get(key).ok_or_else(|| GgufError::MissingKey { path: self.path.clone(), key: key.into() })
    }

    fn wrong(&self, key: &str, expected: &'static str, v: &MetaValue) -> GgufError {
        GgufError::WrongType { path: self.path.clone(), key: key.into(), expected, found: v.type_name() }
    }

    /// A string value.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        match self.require(key)? {
            MetaValue::String(s) => Ok(s),
            v => Err(self.wrong(key, "a string", v)),
        }
    }

    /// An integer value of any integer type that fits in u32 (writers vary between u32/i32/u64).
    pub fn get_u32(&self, key: &str) -> Result<u32> {
        let v = self.require(key)?;
        v.as_i128().and_then(|i| u32::try_from(i).ok()).ok_or_else(|| self.wrong(key, "an integer in u32 range", v))
    }

    /// An integer value of any integer type that fits in u64.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self.require(key)?;
        v.as_i128().and_then(|i| u64::try_from(i).ok()).ok_or_else(|| self.wrong(key, "an integer in u64 range", v))
    }

    /// A float value (f32, f64 or integer, narrowed to f32).
    pub fn get_f32(&self, key: &str) -> Result<f32> {
        let v = self.require(key)?;
        v.as_f64().map(|f| f as f32).ok_or_else(|| self.wrong(key, "a number", v))
    }

    /// A bool value.
    pub fn get_bool(&self, key: &str) -> Result<bool> {
        match self.require(key)? {
            MetaValue::Bool(b) => Ok(*b),
            v => Err(self.wrong(key, "a bool", v)),
        }
    }

    /// An array value of any element type.
    pub fn get_array(&self, key: &str) -> Result<&MetaArray> {
        match self.require(key)? {
            MetaValue::Array(a) => Ok(a),
            v => Err(self.wrong(key, "an array", v)),
        }
    }

    /// An array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<&[String]> {
        match self.require(key)? {
            MetaValue::Array(MetaArray::String(a)) => Ok(a),
            v => Err(self.wrong(key, "an array of strings", v)),
        }
    }

    /// An array of f32.
    pub fn get_f32_array(&self, key: &str) -> Result<&[f32]> {
        match self.require(key)? {
            MetaValue::Array(MetaArray::F32(a)) => Ok(a),
            v => Err(self.wrong(key, "an array of f32", v)),
        }
    }

    /// An array of integers of any integer element type, widened to i64.
    pub fn get_int_array(&self, key: &str) -> Result<Vec<i64>> {
        let v = self.require(key)?;
        match v {
            MetaValue::Array(a) => a.to_i64_vec(),
            _ => None,
        }
        .ok_or_else(|| self.wrong(key, "an array of integers", v))
    }

    /// `Ok(None)` when `key` is absent, otherwise the lookup's result: for optional keys, where a
    /// missing key is fine but a key of the wrong type is still an error.
    pub fn optional<'a, T>(&'a self, key: &str, get: impl FnOnce(&'a Self, &str) -> Result<T>) -> Result<Option<T>> {
        if self.get(key).is_none() {
            return Ok(None);
        }
        get(self, key).map(Some)
    }

    /// All tensor infos in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor info named `name`.
    pub fn tensor(&self, name: &str) -> Result<&TensorInfo> {
        self.tensor_index
            .get(name)
            .map(|&i| &self.tensors[i])
            .ok_or_else(|| GgufError::MissingTensor { path: self.path.clone(), tensor: name.into() })
    }

    /// The raw (still quantized) bytes of a tensor. The range was validated at open time.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.data.bytes()[info.byte_range.start as usize..info.byte_range.end as usize]
    }

    /// Dequantizes the tensor `name` to f32, in row-major order of [`TensorInfo::shape`].
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>> {
        let info = self.tensor(name)?;
        dequantize(info.ggml_type, self.tensor_bytes(info), info.n_elements() as usize).map_err(|e| self.dequant_error(name, e))
    }

    /// Converts the tensor `name` to an MLX affine triplet in its narrowest layout (see
    /// [`affine_layouts`]), exact in f32.
    pub fn to_mlx_affine(&self, name: &str) -> Result<MlxAffine> {
        let info = self.tensor(name)?;
        match affine_layouts(info.ggml_type).first() {
            Some(&layout) => self.to_mlx_affine_as(name, layout),
            None => Err(self.dequant_error(name, DequantError::NotAffine(info.ggml_type))),
        }
    }

    /// [`Self::to_mlx_affine`] in `layout`, one of the tensor type's [`affine_layouts`].
    pub fn to_mlx_affine_as(&self, name: &str, layout: AffineLayout) -> Result<MlxAffine> {
        let info = self.tensor(name)?;
        let cols = info.row_len();
        let rows = (info.n_elements() as usize).checked_div(cols).unwrap_or(0);
        to_mlx_affine_as(info.ggml_type, layout, self.tensor_bytes(info), rows, cols).map_err(|e| self.dequant_error(name, e))
    }

    fn dequant_error(&self, name: &str, source: DequantError) -> GgufError {
        GgufError::Dequant { path: self.path.clone(), tensor: name.into(), source }
    }
}
