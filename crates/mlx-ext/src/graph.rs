//! Ordering in MLX's lazy graph for ops that write their inputs in place.
//!
//! A decode step that writes a token into the cache buffers it was handed
//! ([`crate::cpu::decode_step`]) has no output those buffers come from, so nothing after it
//! would wait for it: the next step (or a slice update of the same buffers) could run first
//! and miss the row. [`depends`] gives the buffers back as arrays that share their memory
//! and are ready only after the step, and the cache keeps those.

use crate::{ExtError, Result};
use mlx_rs::Array;

/// `inputs` again (the same buffers, no copy), evaluated only after every array of `after`.
pub fn depends(inputs: &[&Array], after: &[&Array]) -> Result<Vec<Array>> {
    unsafe {
        let vec = |xs: &[&Array]| {
            let v = mlx_sys::mlx_vector_array_new();
            for a in xs {
                mlx_sys::mlx_vector_array_append_value(v, a.as_ptr());
            }
            v
        };
        let (ins, deps) = (vec(inputs), vec(after));
        let mut outs = mlx_sys::mlx_vector_array_new();
        let rc = mlx_sys::mlx_depends(&mut outs, ins, deps);
        mlx_sys::mlx_vector_array_free(ins);
        mlx_sys::mlx_vector_array_free(deps);
        if rc != 0 {
            mlx_sys::mlx_vector_array_free(outs);
            return Err(ExtError::Primitive("mlx depends failed".into()));
        }
        let got = (0..inputs.len())
            .map(|i| {
                let mut a = mlx_sys::mlx_array_new();
                mlx_sys::mlx_vector_array_get(&mut a, outs, i);
                Array::from_ptr(a)
            })
            .collect();
        mlx_sys::mlx_vector_array_free(outs);
        Ok(got)
    }
}

/// `a` as a row-contiguous array (a copy only where it is not one), on the default stream.
/// MLX's slice update that covers its whole destination returns the update itself, which may
/// be a strided view of a larger array (a sink token sliced from a prompt chunk); a buffer kept
/// that way reaches each CUDA kernel launch as one more copy op.
pub fn contiguous(a: &Array) -> Result<Array> {
    let stream = mlx_rs::Stream::new();
    unsafe {
        let mut res = mlx_sys::mlx_array_new();
        if mlx_sys::mlx_contiguous(&mut res, a.as_ptr(), false, stream.as_ptr()) != 0 {
            mlx_sys::mlx_array_free(res);
            return Err(ExtError::Primitive("mlx contiguous failed".into()));
        }
        Ok(Array::from_ptr(res))
    }
}

/// Whether an evaluated `a` is row-contiguous (what MLX's custom kernels need to read it
/// without a copy); false for an array not yet evaluated.
pub fn is_row_contiguous(a: &Array) -> bool {
    let mut available = false;
    let mut row = false;
    unsafe {
        mlx_sys::_mlx_array_is_available(&mut available, a.as_ptr());
        if available {
            mlx_sys::_mlx_array_is_row_contiguous(&mut row, a.as_ptr());
        }
    }
    available && row
}
