//! An evaluated, row-contiguous MLX array viewed as safetensors data, borrowed from MLX's buffer,
//! so a file is written without a second copy of the arrays in memory (`convert`'s shards and
//! saved KV caches both write through it).

use mlx_rs::{Array, Dtype};
use safetensors::Dtype as St;
use std::borrow::Cow;

/// The bytes of one array, with its safetensors dtype and shape.
pub struct TensorBytes<'a> {
    dtype: St,
    shape: Vec<usize>,
    data: &'a [u8],
}

impl safetensors::View for &TensorBytes<'_> {
    fn dtype(&self) -> St {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Why an array cannot be viewed; each caller words it for its own file.
#[derive(Debug)]
pub enum BytesError {
    /// MLX could not hand out the data (not evaluated, not contiguous): its message.
    Read(String),
    /// A dtype safetensors files here do not hold.
    Dtype(Dtype),
    /// Safetensors is little-endian, the memory order of every host MLX runs on.
    BigEndian,
}

fn raw<T: mlx_rs::ArrayElement>(a: &Array) -> Result<&[u8], BytesError> {
    if a.size() == 0 {
        return Ok(&[]);
    }
    let s = a.try_as_slice::<T>().map_err(|e| BytesError::Read(e.to_string()))?;
    // SAFETY: any initialized memory may be viewed as bytes; the length is the slice's size in
    // bytes and the borrow keeps `a` (and so its buffer) alive.
    Ok(unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), std::mem::size_of_val(s)) })
}

/// Views `a` as safetensors data: f32, f16, bf16, u32, i32 or u8.
pub fn tensor_bytes(a: &Array) -> Result<TensorBytes<'_>, BytesError> {
    if cfg!(target_endian = "big") {
        return Err(BytesError::BigEndian);
    }
    let (dtype, data) = match a.dtype() {
        Dtype::Float32 => (St::F32, raw::<f32>(a)?),
        Dtype::Float16 => (St::F16, raw::<half::f16>(a)?),
        Dtype::Bfloat16 => (St::BF16, raw::<half::bf16>(a)?),
        Dtype::Uint32 => (St::U32, raw::<u32>(a)?),
        Dtype::Int32 => (St::I32, raw::<i32>(a)?),
        Dtype::Uint8 => (St::U8, raw::<u8>(a)?),
        other => return Err(BytesError::Dtype(other)),
    };
    Ok(TensorBytes { dtype, shape: a.shape().iter().map(|&d| d as usize).collect(), data })
}
