//! A minimal GGUF writer, for building small files in tests (hand-made blocks, corrupted
//! headers). It writes exactly what it is given; it does not validate. Test-only, so it lives
//! here and not in the engine.

use models::gguf::{GgmlType, MetaArray, MetaValue};

/// Builds a GGUF image in memory.
#[derive(Debug, Clone)]
pub struct GgufBuilder {
    version: u32,
    alignment: u64,
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

impl GgufBuilder {
    /// An empty v3 file with the default alignment of 32.
    pub fn new() -> Self {
        Self { version: 3, alignment: 32, metadata: Vec::new(), tensors: Vec::new() }
    }

    /// Sets the version written in the header (no other layout change: v2 and v3 share it).
    pub fn version(mut self, version: u32) -> Self {
        self.version = version;
        self
    }

    /// Sets the alignment used for padding; it is also written as `general.alignment` when not 32.
    pub fn alignment(mut self, alignment: u64) -> Self {
        self.alignment = alignment;
        if alignment != 32 {
            self.metadata.push(("general.alignment".into(), MetaValue::U32(alignment as u32)));
        }
        self
    }

    /// Adds a metadata pair.
    pub fn kv(mut self, key: &str, value: MetaValue) -> Self {
        self.metadata.push((key.into(), value));
        self
    }

    /// Adds a tensor with ggml-order dims and its raw bytes.
    pub fn tensor(self, name: &str, ggml_shape: &[u64], ty: GgmlType, bytes: Vec<u8>) -> Self {
        self.tensor_raw_type(name, ggml_shape, type_id(ty), bytes)
    }

    /// Adds a tensor with an arbitrary type id (to build invalid files).
    pub fn tensor_raw_type(mut self, name: &str, ggml_shape: &[u64], type_id: u32, bytes: Vec<u8>) -> Self {
        self.tensors.push((name.into(), ggml_shape.to_vec(), type_id, bytes));
        self
    }

    /// Serializes the file.
    pub fn build(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(self.version.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut out, k);
            out.extend(value_type(v).to_le_bytes());
            put_value(&mut out, v);
        }
        let align = self.alignment.max(1);
        let mut offset = 0u64;
        let mut offsets = Vec::new();
        for (name, dims, ty, bytes) in &self.tensors {
            put_str(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
            out.extend(ty.to_le_bytes());
            out.extend(offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + bytes.len() as u64).div_ceil(align) * align;
        }
        let data_start = (out.len() as u64).div_ceil(align) * align;
        out.resize(data_start as usize, 0);
        for ((_, _, _, bytes), off) in self.tensors.iter().zip(offsets) {
            out.resize((data_start + off) as usize, 0);
            out.extend(bytes);
        }
        out
    }
}

impl Default for GgufBuilder {
    fn default() -> Self {
        Self::new()
    }
}

/// The ggml id of a type (inverse of [`GgmlType::from_id`]).
pub fn type_id(ty: GgmlType) -> u32 {
    (0..64).find(|&i| GgmlType::from_id(i) == Some(ty)).unwrap_or(u32::MAX)
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn value_type(v: &MetaValue) -> u32 {
    match v {
        MetaValue::U8(_) => 0,
        MetaValue::I8(_) => 1,
        MetaValue::U16(_) => 2,
        MetaValue::I16(_) => 3,
        MetaValue::U32(_) => 4,
        MetaValue::I32(_) => 5,
        MetaValue::F32(_) => 6,
        MetaValue::Bool(_) => 7,
        MetaValue::String(_) => 8,
        MetaValue::Array(_) => 9,
        MetaValue::U64(_) => 10,
        MetaValue::I64(_) => 11,
        MetaValue::F64(_) => 12,
    }
}

fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.extend(x.to_le_bytes()),
        MetaValue::U16(x) => out.extend(x.to_le_bytes()),
        MetaValue::I16(x) => out.extend(x.to_le_bytes()),
        MetaValue::U32(x) => out.extend(x.to_le_bytes()),
        MetaValue::I32(x) => out.extend(x.to_le_bytes()),
        MetaValue::U64(x) => out.extend(x.to_le_bytes()),
        MetaValue::I64(x) => out.extend(x.to_le_bytes()),
        MetaValue::F32(x) => out.extend(x.to_le_bytes()),
        MetaValue::F64(x) => out.extend(x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(*x as u8),
        MetaValue::String(s) => put_str(out, s),
        MetaValue::Array(a) => put_array(out, a),
    }
}

fn put_array(out: &mut Vec<u8>, a: &MetaArray) {
    macro_rules! each {
        ($id:literal, $v:expr, $f:expr) => {{
            out.extend(($id as u32).to_le_bytes());
            out.extend(($v.len() as u64).to_le_bytes());
            $v.iter().for_each(|x| $f(out, x));
        }};
    }
    match a {
        MetaArray::U8(v) => each!(0, v, |o: &mut Vec<u8>, x: &u8| o.push(*x)),
        MetaArray::I8(v) => each!(1, v, |o: &mut Vec<u8>, x: &i8| o.extend(x.to_le_bytes())),
        MetaArray::U16(v) => each!(2, v, |o: &mut Vec<u8>, x: &u16| o.extend(x.to_le_bytes())),
        MetaArray::I16(v) => each!(3, v, |o: &mut Vec<u8>, x: &i16| o.extend(x.to_le_bytes())),
        MetaArray::U32(v) => each!(4, v, |o: &mut Vec<u8>, x: &u32| o.extend(x.to_le_bytes())),
        MetaArray::I32(v) => each!(5, v, |o: &mut Vec<u8>, x: &i32| o.extend(x.to_le_bytes())),
        MetaArray::F32(v) => each!(6, v, |o: &mut Vec<u8>, x: &f32| o.extend(x.to_le_bytes())),
        MetaArray::Bool(v) => each!(7, v, |o: &mut Vec<u8>, x: &bool| o.push(*x as u8)),
        MetaArray::String(v) => each!(8, v, |o: &mut Vec<u8>, x: &String| put_str(o, x)),
        MetaArray::Array(v) => each!(9, v, put_array),
        MetaArray::U64(v) => each!(10, v, |o: &mut Vec<u8>, x: &u64| o.extend(x.to_le_bytes())),
        MetaArray::I64(v) => each!(11, v, |o: &mut Vec<u8>, x: &i64| o.extend(x.to_le_bytes())),
        MetaArray::F64(v) => each!(12, v, |o: &mut Vec<u8>, x: &f64| o.extend(x.to_le_bytes())),
    }
}
