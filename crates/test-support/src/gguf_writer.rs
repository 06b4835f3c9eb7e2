//! A minimal GGUF writer, for building small files in tests (hand-made blocks, corrupted
//! headers). It writes exactly what it is given; it does not validate. Test-only, so it lives
//! here and not in the engine.

// The value encodings are the engine writer's (`models::gguf`); this builder only adds the
// freedom to write invalid files.
use models::gguf::{put_str, put_value, type_id, value_type, GgmlType, MetaValue};

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
