//! The byte encodings a GGUF writer needs: metadata values (little-endian, strings and arrays
//! length-prefixed, as `reader.rs` parses them) and Q4_0 blocks, quantized as ggml's
//! `quantize_row_q4_0_ref` does it, so a file written here holds the blocks llama.cpp's own
//! quantizer would have produced.

use half::f16;

use super::error::DequantError;
use super::types::GgmlType;
use super::value::{MetaArray, MetaValue};

/// Elements per Q4_0 block.
pub const Q4_0_BLOCK: usize = 32;
/// Bytes per Q4_0 block: an f16 scale and 16 bytes of nibbles.
pub const Q4_0_BYTES: usize = 18;

/// Encodes one block of 32 values.
///
/// The scale is the signed element of largest magnitude divided by -8, so that element maps
/// exactly to code 0 and the full range -8..=7 is used; an element of the opposite sign and
/// the same magnitude would need +8 and is clamped to 7, as in ggml. Codes are computed with
/// the f32 scale and rounded half up (`trunc(x/d + 8.5)`), again as ggml does, although the
/// stored scale is the f16 rounding of it.
pub fn quantize_block_q4_0(x: &[f32; Q4_0_BLOCK]) -> [u8; Q4_0_BYTES] {
    let mut max = 0f32;
    for &v in x {
        if v.abs() > max.abs() {
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let code = |v: f32| ((v * id + 8.5) as i8).clamp(0, 15) as u8;
    let mut out = [0u8; Q4_0_BYTES];
    out[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    for j in 0..Q4_0_BLOCK / 2 {
        // Low nibbles hold elements 0..16, high nibbles 16..32.
        out[2 + j] = code(x[j]) | (code(x[j + Q4_0_BLOCK / 2]) << 4);
    }
    out
}

/// Encodes `values` (a whole number of blocks, in ggml order) as consecutive Q4_0 blocks.
pub fn quantize_q4_0(values: &[f32]) -> Result<Vec<u8>, DequantError> {
    if !values.len().is_multiple_of(Q4_0_BLOCK) {
        return Err(DequantError::PartialBlock { ty: GgmlType::Q4_0, n_elements: values.len(), block: Q4_0_BLOCK });
    }
    let mut out = Vec::with_capacity(values.len() / Q4_0_BLOCK * Q4_0_BYTES);
    for block in values.chunks_exact(Q4_0_BLOCK) {
        let mut x = [0f32; Q4_0_BLOCK];
        x.copy_from_slice(block);
        out.extend_from_slice(&quantize_block_q4_0(&x));
    }
    Ok(out)
}

/// The ggml id of a type, the inverse of [`GgmlType::from_id`]; `u32::MAX` for none.
pub fn type_id(ty: GgmlType) -> u32 {
    (0..64).find(|&i| GgmlType::from_id(i) == Some(ty)).unwrap_or(u32::MAX)
}

/// A GGUF string: u64 length, then the UTF-8 bytes.
pub fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The GGUF type id of a metadata value.
pub fn value_type(v: &MetaValue) -> u32 {
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

/// A metadata value's bytes after its type id (arrays carry their element type and count).
pub fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(*x as u8),
        MetaValue::String(s) => put_str(out, s),
        MetaValue::Array(a) => put_array(out, a),
    }
}

/// Element type id, count, then the elements (strings length-prefixed, arrays with headers).
fn put_array(out: &mut Vec<u8>, a: &MetaArray) {
    macro_rules! fixed {
        ($id:literal, $v:expr) => {{
            out.extend_from_slice(&($id as u32).to_le_bytes());
            out.extend_from_slice(&($v.len() as u64).to_le_bytes());
            $v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
        }};
    }
    let header = |out: &mut Vec<u8>, id: u32, n: usize| {
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&(n as u64).to_le_bytes());
    };
    match a {
        MetaArray::U8(v) => fixed!(0, v),
        MetaArray::I8(v) => fixed!(1, v),
        MetaArray::U16(v) => fixed!(2, v),
        MetaArray::I16(v) => fixed!(3, v),
        MetaArray::U32(v) => fixed!(4, v),
        MetaArray::I32(v) => fixed!(5, v),
        MetaArray::F32(v) => fixed!(6, v),
        MetaArray::U64(v) => fixed!(10, v),
        MetaArray::I64(v) => fixed!(11, v),
        MetaArray::F64(v) => fixed!(12, v),
        MetaArray::Bool(v) => {
            header(out, 7, v.len());
            out.extend(v.iter().map(|&b| b as u8));
        }
        MetaArray::String(v) => {
            header(out, 8, v.len());
            v.iter().for_each(|s| put_str(out, s));
        }
        MetaArray::Array(v) => {
            header(out, 9, v.len());
            v.iter().for_each(|x| put_array(out, x));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::dequantize;

    /// Values of a fixed-seed LCG in [-scale, scale), varied enough to hit every code.
    fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    /// The largest error ggml's scheme allows for `v` in a block of f32 scale `d` stored as `d16`:
    /// half a step inside the code range, the distance to the range's edge beyond it (the clamp
    /// at +7), plus what rounding the scale to f16 moves a code of magnitude at most 8.
    fn error_bound(v: f32, d: f32, d16: f32) -> f32 {
        const F32_SLACK: f32 = 1e-6;
        let t = v / d;
        let outside = (t - t.clamp(-8.0, 7.0)).abs() * d.abs();
        outside + 0.5 * d.abs() + 8.0 * (d - d16).abs() + F32_SLACK * v.abs().max(d.abs())
    }

    #[test]
    fn round_trip_is_within_the_step_bound() {
        for (seed, scale) in [(1u64, 1.0f32), (2, 0.02), (3, 300.0), (4, 1e-3)] {
            let x = values(32 * 64, seed, scale);
            let q = quantize_q4_0(&x).unwrap();
            assert_eq!(q.len(), 64 * Q4_0_BYTES);
            let y = dequantize(GgmlType::Q4_0, &q, x.len()).unwrap();
            for (b, (xb, yb)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
                let max = xb.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                let d = max / -8.0;
                let d16 = f16::from_le_bytes([q[b * Q4_0_BYTES], q[b * Q4_0_BYTES + 1]]).to_f32();
                for (&v, &w) in xb.iter().zip(yb) {
                    let bound = error_bound(v, d, d16);
                    assert!((v - w).abs() <= bound, "seed {seed} block {b}: {v} -> {w}, bound {bound}");
                }
            }
        }
    }

    #[test]
    fn values_on_the_grid_round_trip_exactly() {
        for d in [0.0123f32, -0.5, 3.0, 1.0 / 1024.0] {
            let d = f16::from_f32(d).to_f32();
            // Code 0 (-8d) is the largest magnitude, so the encoder recovers exactly d.
            let codes: Vec<i32> = (0..32).map(|j| if j == 5 { 0 } else { (j * 7 + 3) % 16 }).collect();
            let x: Vec<f32> = codes.iter().map(|&c| (c - 8) as f32 * d).collect();
            let q = quantize_q4_0(&x).unwrap();
            assert_eq!(f16::from_le_bytes([q[0], q[1]]).to_f32(), d);
            assert_eq!(dequantize(GgmlType::Q4_0, &q, 32).unwrap(), x, "d = {d}");
        }
    }

    #[test]
    fn clamps_the_opposite_extreme_and_zeros() {
        // max = -1 gives d = 1/8; +1 would need code 16 and takes 15 (0.875), as in ggml.
        let mut x = [0f32; 32];
        x[0] = -1.0;
        x[20] = 1.0;
        let b = quantize_block_q4_0(&x);
        let y = dequantize(GgmlType::Q4_0, &b, 32).unwrap();
        assert_eq!((y[0], y[20], y[1]), (-1.0, 0.875, 0.0));
        assert_eq!(b[2] & 0x0F, 0);
        assert_eq!(b[2 + 4] >> 4, 15);
        let zero = quantize_block_q4_0(&[0.0; 32]);
        assert_eq!(&zero[2..], &[0x88; 16]);
        assert_eq!(dequantize(GgmlType::Q4_0, &zero, 32).unwrap(), vec![0.0; 32]);
        assert!(matches!(quantize_q4_0(&[1.0; 33]), Err(DequantError::PartialBlock { n_elements: 33, .. })));
    }
}
