//! Writing GGUF v3 files, the layout [`super::GgufFile`] reads (see `reader.rs`).
//!
//! Tensors are described up front and their bytes are produced one tensor at a time by a
//! callback that writes straight into the file: an 8B model is gigabytes, more than should be
//! held in memory at once. The file is written under a temporary name in the target directory
//! and renamed into place at the end, so a reader never sees a half-written model.

use std::collections::HashSet;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use super::encode::{put_str, put_value, type_id, value_type};
use super::error::GgufError;
use super::reader::DEFAULT_ALIGNMENT;
use super::types::GgmlType;
use super::value::{MetaArray, MetaValue};
use crate::error::{ModelError, Result};

const GGUF_VERSION: u32 = 3;
/// ggml stores names in 64 bytes including the terminating NUL, and llama.cpp refuses longer.
const MAX_NAME_LEN: usize = 63;
const MAX_DIMS: usize = 4;
/// Large writes keep a multi-gigabyte file from costing a system call per tensor row.
const WRITE_BUFFER: usize = 8 << 20;

/// A tensor to be written: ggml dims (`ggml_shape[0]` the contiguous axis, so a row-major
/// `[out, in]` matrix is `[in, out]`) and the element encoding.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub ggml_shape: Vec<u64>,
    pub ggml_type: GgmlType,
}

impl TensorSpec {
    pub fn n_elements(&self) -> u64 {
        self.ggml_shape.iter().product()
    }

    /// Bytes of the tensor's data (whole blocks; [`GgufWriter::write`] checks the shape first).
    pub fn n_bytes(&self) -> u64 {
        let (block, size) = self.ggml_type.block_geometry();
        self.n_elements() / block as u64 * size as u64
    }
}

/// Metadata and tensor descriptions of a GGUF file to be written.
#[derive(Debug, Clone, Default)]
pub struct GgufWriter {
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<TensorSpec>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a metadata pair. `general.alignment` also sets the data alignment (default 32).
    pub fn add(&mut self, key: &str, value: MetaValue) -> &mut Self {
        self.metadata.push((key.to_string(), value));
        self
    }

    pub fn add_string(&mut self, key: &str, v: &str) -> &mut Self {
        self.add(key, MetaValue::String(v.to_string()))
    }

    pub fn add_u32(&mut self, key: &str, v: u32) -> &mut Self {
        self.add(key, MetaValue::U32(v))
    }

    pub fn add_i32(&mut self, key: &str, v: i32) -> &mut Self {
        self.add(key, MetaValue::I32(v))
    }

    pub fn add_u64(&mut self, key: &str, v: u64) -> &mut Self {
        self.add(key, MetaValue::U64(v))
    }

    pub fn add_f32(&mut self, key: &str, v: f32) -> &mut Self {
        self.add(key, MetaValue::F32(v))
    }

    pub fn add_bool(&mut self, key: &str, v: bool) -> &mut Self {
        self.add(key, MetaValue::Bool(v))
    }

    pub fn add_string_array(&mut self, key: &str, v: Vec<String>) -> &mut Self {
        self.add(key, MetaValue::Array(MetaArray::String(v)))
    }

    pub fn add_f32_array(&mut self, key: &str, v: Vec<f32>) -> &mut Self {
        self.add(key, MetaValue::Array(MetaArray::F32(v)))
    }

    pub fn add_i32_array(&mut self, key: &str, v: Vec<i32>) -> &mut Self {
        self.add(key, MetaValue::Array(MetaArray::I32(v)))
    }

    /// Describes the next tensor; its bytes come from the callback of [`Self::write`].
    pub fn add_tensor(&mut self, name: &str, ggml_shape: &[u64], ggml_type: GgmlType) -> &mut Self {
        self.tensors.push(TensorSpec { name: name.to_string(), ggml_shape: ggml_shape.to_vec(), ggml_type });
        self
    }

    /// The tensors described so far, in file order.
    pub fn tensors(&self) -> &[TensorSpec] {
        &self.tensors
    }

    /// Writes the file at `path`. `data(i, spec, out)` must write exactly `spec.n_bytes()` bytes
    /// of tensor `i` to `out`; it is called once per tensor, in order. On any error the
    /// temporary file is removed and `path` is left as it was.
    pub fn write<F>(&self, path: &Path, mut data: F) -> Result<()>
    where
        F: FnMut(usize, &TensorSpec, &mut dyn Write) -> io::Result<()>,
    {
        let alignment = self.validate(path)?;
        let temp = Temp::create(path)?;
        let ctx = |what: String| move |e: io::Error| io_error(path, &what, e);
        let mut out = BufWriter::with_capacity(WRITE_BUFFER, &temp.file);
        self.write_header(&mut out, alignment).map_err(ctx("writing the header".into()))?;
        // Position in the data section, which tensor offsets are relative to.
        let mut pos = 0u64;
        for (i, spec) in self.tensors.iter().enumerate() {
            let start = pos.div_ceil(alignment) * alignment;
            pad(&mut out, start - pos).map_err(ctx(format!("padding before tensor '{}'", spec.name)))?;
            let mut counted = Counted { inner: &mut out, n: 0 };
            data(i, spec, &mut counted).map_err(ctx(format!("writing tensor '{}'", spec.name)))?;
            if counted.n != spec.n_bytes() {
                let reason = format!("{} bytes were written for {} bytes of data", counted.n, spec.n_bytes());
                return Err(GgufError::BadTensor { path: path.into(), tensor: spec.name.clone(), reason }.into());
            }
            pos = start + counted.n;
        }
        out.flush().map_err(ctx("flushing".into()))?;
        drop(out);
        temp.commit(path)
    }

    /// Checks names, shapes and the alignment; returns the alignment.
    fn validate(&self, path: &Path) -> Result<u64> {
        let duplicate = |what, name: &str| GgufError::Duplicate { path: path.into(), what, name: name.into() };
        let mut keys = HashSet::new();
        for (k, _) in &self.metadata {
            if !keys.insert(k.as_str()) {
                return Err(duplicate("metadata key", k).into());
            }
        }
        let mut names = HashSet::new();
        for t in &self.tensors {
            let bad = |reason: String| GgufError::BadTensor { path: path.into(), tensor: t.name.clone(), reason };
            if !names.insert(t.name.as_str()) {
                return Err(duplicate("tensor", &t.name).into());
            }
            if t.name.len() > MAX_NAME_LEN {
                return Err(bad(format!("name is {} bytes, ggml allows at most {MAX_NAME_LEN}", t.name.len())).into());
            }
            if t.ggml_shape.is_empty() || t.ggml_shape.len() > MAX_DIMS {
                return Err(bad(format!("{} dimensions, ggml allows 1 to {MAX_DIMS}", t.ggml_shape.len())).into());
            }
            let block = t.ggml_type.block_size() as u64;
            if t.ggml_shape[0] % block != 0 {
                return Err(bad(format!(
                    "first dimension {} is not a multiple of the {} block size {block}",
                    t.ggml_shape[0], t.ggml_type
                ))
                .into());
            }
            if type_id(t.ggml_type) == u32::MAX {
                return Err(bad(format!("type {} has no ggml id", t.ggml_type)).into());
            }
            if t.ggml_shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).is_none() {
                return Err(bad(format!("shape {:?} overflows 64 bits", t.ggml_shape)).into());
            }
        }
        match self.metadata.iter().find(|(k, _)| k == "general.alignment") {
            None => Ok(DEFAULT_ALIGNMENT),
            Some((_, v)) => match v.as_i128() {
                Some(a) if a > 0 && (a as u128).is_power_of_two() && a <= 1 << 30 => Ok(a as u64),
                a => Err(GgufError::BadAlignment { path: path.into(), alignment: a.unwrap_or(0) as u64 }.into()),
            },
        }
    }

    /// Header, metadata, tensor infos and the padding up to the data section.
    fn write_header(&self, out: &mut impl Write, alignment: u64) -> io::Result<()> {
        let mut head = Vec::new();
        head.extend_from_slice(b"GGUF");
        head.extend_from_slice(&GGUF_VERSION.to_le_bytes());
        head.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        head.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut head, k);
            head.extend_from_slice(&value_type(v).to_le_bytes());
            put_value(&mut head, v);
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            put_str(&mut head, &t.name);
            head.extend_from_slice(&(t.ggml_shape.len() as u32).to_le_bytes());
            t.ggml_shape.iter().for_each(|d| head.extend_from_slice(&d.to_le_bytes()));
            head.extend_from_slice(&type_id(t.ggml_type).to_le_bytes());
            // Offsets are relative to the data section, each a multiple of the alignment.
            head.extend_from_slice(&offset.to_le_bytes());
            offset = (offset + t.n_bytes()).div_ceil(alignment) * alignment;
        }
        let data_start = (head.len() as u64).div_ceil(alignment) * alignment;
        head.resize(data_start as usize, 0);
        out.write_all(&head)
    }
}

fn io_error(path: &Path, what: &str, e: io::Error) -> ModelError {
    ModelError::Io { path: path.into(), source: io::Error::new(e.kind(), format!("{what}: {e}")) }
}

fn pad(out: &mut impl Write, n: u64) -> io::Result<()> {
    const ZEROS: [u8; 64] = [0; 64];
    let mut left = n as usize;
    while left > 0 {
        let k = left.min(ZEROS.len());
        out.write_all(&ZEROS[..k])?;
        left -= k;
    }
    Ok(())
}

/// Counts what a tensor's callback writes, to check it against the declared size.
struct Counted<'a, W: Write> {
    inner: &'a mut W,
    n: u64,
}

impl<W: Write> Write for Counted<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let k = self.inner.write(buf)?;
        self.n += k as u64;
        Ok(k)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The temporary file beside the target, removed unless [`Temp::commit`] renames it.
struct Temp {
    file: std::fs::File,
    path: PathBuf,
    committed: bool,
}

impl Temp {
    fn create(target: &Path) -> Result<Self> {
        let Some(name) = target.file_name() else {
            return Err(io_error(target, "no file name", io::ErrorKind::InvalidInput.into()));
        };
        let mut temp_name = std::ffi::OsString::from(".");
        temp_name.push(name);
        temp_name.push(format!(".{}.partial", std::process::id()));
        let path = target.with_file_name(temp_name);
        let file = std::fs::File::create(&path).map_err(|e| io_error(&path, "creating", e))?;
        Ok(Temp { file, path, committed: false })
    }

    fn commit(mut self, target: &Path) -> Result<()> {
        self.file.sync_all().map_err(|e| io_error(&self.path, "syncing", e))?;
        std::fs::rename(&self.path, target)
            .map_err(|e| io_error(target, &format!("renaming {} to it", self.path.display()), e))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        if !self.committed {
            // Best effort: the error being reported matters more than a leftover file.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kvsplit-gguf-writer-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn refuses_bad_input_and_leaves_nothing() {
        let dir = temp_dir("refuse");
        let path = dir.join("bad.gguf");
        let one = |w: &GgufWriter| w.write(&path, |_, _, out| out.write_all(&[0; 4])).unwrap_err().to_string();

        let mut short = GgufWriter::new();
        short.add_tensor("t", &[2], GgmlType::F32);
        let e = one(&short);
        assert!(e.contains("bad.gguf") && e.contains("4 bytes were written for 8"), "{e}");

        let mut dup = GgufWriter::new();
        dup.add_u32("k", 1).add_u32("k", 2);
        assert!(one(&dup).contains("duplicate metadata key 'k'"));

        let mut partial = GgufWriter::new();
        partial.add_tensor("t", &[16], GgmlType::Q4_0);
        assert!(one(&partial).contains("not a multiple of the Q4_0 block size 32"));

        let mut align = GgufWriter::new();
        align.add_u32("general.alignment", 48);
        assert!(one(&align).contains("power of two, got 48"));

        let failing = |_: usize, _: &TensorSpec, _: &mut dyn Write| Err(io::Error::other("generator failed"));
        let e = short.write(&path, failing).unwrap_err().to_string();
        assert!(e.contains("writing tensor 't': generator failed"), "{e}");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "a refused write left a file");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
