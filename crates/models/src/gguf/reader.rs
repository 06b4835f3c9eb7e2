//! Parsing of the GGUF header, metadata and tensor infos from a byte slice.
//!
//! Layout (all little-endian): magic "GGUF", u32 version, u64 tensor count, u64 metadata count,
//! the metadata key/value pairs, the tensor infos, padding to `general.alignment` (default 32),
//! then the tensor data. Every count read from the file is checked against the bytes left before
//! anything is allocated, so a corrupt file gives an error, never a huge allocation or a panic.

use std::collections::HashMap;
use std::path::Path;

use super::error::{GgufError, Result};
use super::value::{MetaArray, MetaValue};
use super::{GgmlType, TensorInfo};

/// Alignment of the data section when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most 4 dimensions.
const MAX_DIMS: u32 = 4;
/// Arrays of arrays deeper than this are refused, so a crafted file cannot overflow the stack.
const MAX_ARRAY_DEPTH: usize = 8;
/// Longest key or tensor name accepted (ggml itself caps tensor names at 64 bytes).
const MAX_NAME_LEN: u64 = 1 << 16;

/// Everything before the tensor data.
pub(crate) struct Parsed {
    pub version: u32,
    pub metadata: Vec<(String, MetaValue)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    pub data_offset: u64,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn truncated(&self, what: &str) -> GgufError {
        GgufError::Truncated {
            path: self.path.to_path_buf(),
            what: what.to_string(),
            offset: self.pos as u64,
            file_len: self.buf.len() as u64,
        }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.truncated(what));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Checks that `count` items of at least `min_size` bytes each can still fit in the file.
    fn check_count(&self, count: u64, min_size: usize, what: &str) -> Result<usize> {
        let limit = (self.remaining() / min_size.max(1)) as u64;
        if count > limit {
            return Err(GgufError::TooLarge {
                path: self.path.to_path_buf(),
                what: format!("{what} (count at byte {})", self.pos),
                value: count,
                limit,
            });
        }
        Ok(count as usize)
    }

    fn bytes_of_string(&mut self, what: &str) -> Result<&'a [u8]> {
        let len = self.u64(what)?;
        if len > self.remaining() as u64 {
            return Err(self.truncated(what));
        }
        self.take(len as usize, what)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let b = self.bytes_of_string(what)?;
        String::from_utf8(b.to_vec()).map_err(|_| GgufError::InvalidUtf8 {
            path: self.path.to_path_buf(),
            what: what.to_string(),
        })
    }

    fn name(&mut self, what: &str) -> Result<String> {
        let at = self.pos;
        let len = self.u64(what)?;
        if len > MAX_NAME_LEN {
            return Err(GgufError::TooLarge {
                path: self.path.to_path_buf(),
                what: format!("length of {what} at byte {at}"),
                value: len,
                limit: MAX_NAME_LEN,
            });
        }
        self.pos = at;
        self.string(what)
    }

    fn value(&mut self, type_id: u32, key: &str, depth: usize) -> Result<MetaValue> {
        let what = format!("value of '{key}'");
        let w = what.as_str();
        Ok(match type_id {
            0 => MetaValue::U8(self.array::<1>(w)?[0]),
            1 => MetaValue::I8(self.array::<1>(w)?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.array(w)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array(w)?)),
            4 => MetaValue::U32(u32::from_le_bytes(self.array(w)?)),
            5 => MetaValue::I32(i32::from_le_bytes(self.array(w)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array(w)?)),
            7 => MetaValue::Bool(self.array::<1>(w)?[0] != 0),
            8 => MetaValue::String(self.string(w)?),
            9 => MetaValue::Array(self.meta_array(key, depth)?),
            10 => MetaValue::U64(u64::from_le_bytes(self.array(w)?)),
            11 => MetaValue::I64(i64::from_le_bytes(self.array(w)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array(w)?)),
            _ => return Err(self.unknown_type(key, type_id)),
        })
    }

    fn unknown_type(&self, key: &str, type_id: u32) -> GgufError {
        GgufError::UnknownValueType { path: self.path.to_path_buf(), key: key.to_string(), type_id }
    }

    fn meta_array(&mut self, key: &str, depth: usize) -> Result<MetaArray> {
        if depth >= MAX_ARRAY_DEPTH {
            return Err(GgufError::TooLarge {
                path: self.path.to_path_buf(),
                what: format!("array nesting depth of '{key}'"),
                value: depth as u64 + 1,
                limit: MAX_ARRAY_DEPTH as u64,
            });
        }
        let what = format!("array header of '{key}'");
        let elem_type = self.u32(&what)?;
        let count = self.u64(&what)?;
        let what = format!("array elements of '{key}'");
        let w = what.as_str();
        macro_rules! fixed {
            ($variant:ident, $t:ty, $n:literal) => {{
                let n = self.check_count(count, $n, w)?;
                let raw = self.take(n * $n, w)?;
                MetaArray::$variant(
                    raw.chunks_exact($n).map(|c| <$t>::from_le_bytes(c.try_into().unwrap())).collect(),
                )
            }};
        }
        Ok(match elem_type {
            0 => fixed!(U8, u8, 1),
            1 => fixed!(I8, i8, 1),
            2 => fixed!(U16, u16, 2),
            3 => fixed!(I16, i16, 2),
            4 => fixed!(U32, u32, 4),
            5 => fixed!(I32, i32, 4),
            6 => fixed!(F32, f32, 4),
            7 => {
                let n = self.check_count(count, 1, w)?;
                MetaArray::Bool(self.take(n, w)?.iter().map(|&b| b != 0).collect())
            }
            8 => {
                let n = self.check_count(count, 8, w)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.string(w)?);
                }
                MetaArray::String(v)
            }
            9 => {
                // A nested array header is 12 bytes.
                let n = self.check_count(count, 12, w)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.meta_array(key, depth + 1)?);
                }
                MetaArray::Array(v)
            }
            10 => fixed!(U64, u64, 8),
            11 => fixed!(I64, i64, 8),
            12 => fixed!(F64, f64, 8),
            _ => return Err(self.unknown_type(key, elem_type)),
        })
    }
}

/// Parses everything up to the data section and validates every tensor's byte range.
pub(crate) fn parse(buf: &[u8], path: &Path) -> Result<Parsed> {
    let mut c = Cursor { buf, pos: 0, path };
    let magic: [u8; 4] = c.array("magic")?;
    if &magic != b"GGUF" {
        return Err(GgufError::BadMagic { path: path.to_path_buf(), found: magic });
    }
    let version = c.u32("version")?;
    if version != 2 && version != 3 {
        let hint = match version {
            1 => " (GGUF v1 used 32-bit counts; re-convert the model)",
            v if v.swap_bytes() <= 3 => " (the file looks big-endian, which is not supported)",
            _ => "",
        };
        return Err(GgufError::UnsupportedVersion { path: path.to_path_buf(), version, hint });
    }
    let n_tensors = c.u64("tensor count")?;
    let n_kv = c.u64("metadata count")?;
    // A key/value pair is at least 8 (key length) + 4 (type) + 1 bytes; a tensor info 8+4+4+8.
    let n_kv = c.check_count(n_kv, 13, "metadata count")?;
    let n_tensors = c.check_count(n_tensors, 24, "tensor count")?;

    let mut metadata = Vec::with_capacity(n_kv);
    let mut seen = HashMap::with_capacity(n_kv);
    for i in 0..n_kv {
        let key = c.name(&format!("metadata key #{i}"))?;
        let type_id = c.u32(&format!("type of '{key}'"))?;
        let value = c.value(type_id, &key, 0)?;
        if seen.insert(key.clone(), ()).is_some() {
            return Err(GgufError::Duplicate { path: path.to_path_buf(), what: "metadata key", name: key });
        }
        metadata.push((key, value));
    }

    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, v)) => match v.as_i128() {
            Some(a) if a > 0 && (a as u128).is_power_of_two() && a <= 1 << 30 => a as u64,
            _ => {
                let alignment = v.as_i128().map(|a| a as u64).unwrap_or(0);
                return Err(GgufError::BadAlignment { path: path.to_path_buf(), alignment });
            }
        },
    };

    let mut raw = Vec::with_capacity(n_tensors);
    let mut names = HashMap::with_capacity(n_tensors);
    for i in 0..n_tensors {
        let name = c.name(&format!("tensor info #{i} name"))?;
        let what = format!("tensor info of '{name}'");
        let n_dims = c.u32(&what)?;
        if n_dims > MAX_DIMS {
            return Err(bad(path, &name, format!("{n_dims} dimensions, ggml allows at most {MAX_DIMS}")));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(c.u64(&what)?);
        }
        let type_id = c.u32(&what)?;
        let offset = c.u64(&what)?;
        if names.insert(name.clone(), ()).is_some() {
            return Err(GgufError::Duplicate { path: path.to_path_buf(), what: "tensor", name });
        }
        raw.push((name, dims, type_id, offset));
    }

    let data_offset = (c.pos as u64).div_ceil(alignment) * alignment;
    let file_len = buf.len() as u64;
    let mut tensors = Vec::with_capacity(raw.len());
    for (name, dims, type_id, offset) in raw {
        let Some(ggml_type) = GgmlType::from_id(type_id) else {
            return Err(GgufError::UnknownGgmlType { path: path.to_path_buf(), tensor: name, type_id });
        };
        let n_bytes = tensor_bytes(&dims, ggml_type).map_err(|r| bad(path, &name, r))?;
        if offset % alignment != 0 {
            return Err(bad(path, &name, format!("data offset {offset} is not a multiple of the alignment {alignment}")));
        }
        let start = data_offset.checked_add(offset);
        let end = start.and_then(|s| s.checked_add(n_bytes));
        match (start, end) {
            (Some(start), Some(end)) if end <= file_len => {
                tensors.push(TensorInfo { name, ggml_shape: dims, ggml_type, offset, byte_range: start..end });
            }
            _ => {
                return Err(GgufError::TensorPastEof {
                    path: path.to_path_buf(),
                    tensor: name,
                    start: start.unwrap_or(u64::MAX),
                    end: end.unwrap_or(u64::MAX),
                    file_len,
                })
            }
        }
    }
    Ok(Parsed { version, metadata, tensors, alignment, data_offset })
}

fn bad(path: &Path, tensor: &str, reason: String) -> GgufError {
    GgufError::BadTensor { path: path.to_path_buf(), tensor: tensor.to_string(), reason }
}

/// Bytes a tensor of these ggml dims takes, checking block divisibility and overflow.
fn tensor_bytes(dims: &[u64], ty: GgmlType) -> std::result::Result<u64, String> {
    let (block, type_size) = ty.block_geometry();
    let ne0 = dims.first().copied().unwrap_or(1);
    if ne0 % block as u64 != 0 {
        return Err(format!("first dimension {ne0} is not a multiple of the {ty} block size {block}"));
    }
    let n: Option<u64> = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
    n.and_then(|n| (n / block as u64).checked_mul(type_size as u64))
        .ok_or_else(|| format!("shape {dims:?} overflows 64 bits"))
}
