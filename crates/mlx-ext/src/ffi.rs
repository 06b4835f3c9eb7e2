//! The C entry points of `csrc/kvsplit_ext.h` (mlx-c's calling convention: results through the
//! first argument, 0 on success). Declared by hand: a few functions do not need bindgen.

use mlx_sys::{mlx_array, mlx_stream};
use std::os::raw::{c_char, c_int, c_void};

extern "C" {
    pub fn kvsplit_ext_last_error() -> *const c_char;
    pub fn kvsplit_dist_is_available(backend: *const c_char) -> bool;
    pub fn kvsplit_dist_init(backend: *const c_char, strict: bool, group: *mut *mut c_void) -> c_int;
    pub fn kvsplit_dist_free(group: *mut c_void);
    pub fn kvsplit_dist_rank(group: *const c_void) -> c_int;
    pub fn kvsplit_dist_size(group: *const c_void) -> c_int;
    pub fn kvsplit_dist_split(group: *const c_void, color: c_int, key: c_int, out: *mut *mut c_void) -> c_int;
    pub fn kvsplit_dist_all_sum(res: *mut mlx_array, x: mlx_array, group: *const c_void) -> c_int;
    pub fn kvsplit_dist_all_gather(res: *mut mlx_array, x: mlx_array, group: *const c_void) -> c_int;
    pub fn kvsplit_dist_send(res: *mut mlx_array, x: mlx_array, dst: c_int, group: *const c_void) -> c_int;
    pub fn kvsplit_dist_recv_like(res: *mut mlx_array, like: mlx_array, src: c_int, group: *const c_void) -> c_int;
    pub fn kvsplit_mode_quantized_matmul(
        res: *mut mlx_array,
        x: mlx_array,
        w: mlx_array,
        scales: mlx_array,
        biases: mlx_array,
        transpose: bool,
        group: c_int,
        bits: c_int,
        mode: *const c_char,
    ) -> c_int;
    pub fn kvsplit_mode_gather_qmm(
        res: *mut mlx_array,
        x: mlx_array,
        w: mlx_array,
        scales: mlx_array,
        biases: mlx_array,
        lhs_indices: mlx_array,
        rhs_indices: mlx_array,
        transpose: bool,
        group: c_int,
        bits: c_int,
        mode: *const c_char,
        sorted: bool,
    ) -> c_int;
    pub fn kvsplit_mode_dequantize(
        res: *mut mlx_array,
        w: mlx_array,
        scales: mlx_array,
        biases: mlx_array,
        group: c_int,
        bits: c_int,
        mode: *const c_char,
    ) -> c_int;
    pub fn kvsplit_mode_quantize(codes: *mut mlx_array, scales: *mut mlx_array, w: mlx_array, group: c_int, bits: c_int, mode: *const c_char) -> c_int;
    pub fn kvsplit_ext_cpu_threads() -> c_int;
    pub fn kvsplit_ext_configure(threads: c_int, force_generic: bool) -> c_int;
    pub fn kvsplit_blas_select() -> *const c_char;
    pub fn kvsplit_cpu_quantized_matvec(
        res: *mut mlx_array,
        x: mlx_array,
        w: mlx_array,
        scales: mlx_array,
        biases: mlx_array,
        group_size: c_int,
        bits: c_int,
        s: mlx_stream,
    ) -> c_int;
    pub fn kvsplit_cpu_mxfp4_matvec(res: *mut mlx_array, x: mlx_array, w: mlx_array, scales: mlx_array, s: mlx_stream) -> c_int;
    pub fn kvsplit_cpu_mxfp4_dequantize(res: *mut mlx_array, w: mlx_array, scales: mlx_array, s: mlx_stream) -> c_int;
    pub fn kvsplit_cpu_dequantize(
        res: *mut mlx_array,
        w: mlx_array,
        scales: mlx_array,
        biases: mlx_array,
        group_size: c_int,
        bits: c_int,
        s: mlx_stream,
    ) -> c_int;
    pub fn kvsplit_cpu_quantized_decode_step(
        res: *mut mlx_array,
        q: mlx_array,
        k_new: mlx_array,
        v_new: mlx_array,
        k_w: mlx_array,
        k_scales: mlx_array,
        k_biases: mlx_array,
        v_w: mlx_array,
        v_scales: mlx_array,
        v_biases: mlx_array,
        slot: c_int,
        k_group: c_int,
        k_bits: c_int,
        v_group: c_int,
        v_bits: c_int,
        softcap: f32,
        s: mlx_stream,
    ) -> c_int;
    pub fn kvsplit_cpu_channel_decode_step(
        res: *mut mlx_array,
        q: mlx_array,
        k_new: mlx_array,
        v_new: mlx_array,
        k_w: mlx_array,
        k_scales: mlx_array,
        k_biases: mlx_array,
        v_w: mlx_array,
        v_scales: mlx_array,
        v_biases: mlx_array,
        tail_k: mlx_array,
        tail_v: mlx_array,
        sink_k: mlx_array,
        sink_v: mlx_array,
        len: c_int,
        row: c_int,
        k_group: c_int,
        k_bits: c_int,
        v_group: c_int,
        v_bits: c_int,
        rot: c_int,
        softcap: f32,
        ranges: *const c_int,
        n_ranges: c_int,
        s: mlx_stream,
    ) -> c_int;
    pub fn kvsplit_cpu_dense_decode_attention(res: *mut mlx_array, q: mlx_array, k: mlx_array, v: mlx_array, len: c_int, causal: bool, softcap: f32, s: mlx_stream) -> c_int;
    pub fn kvsplit_cpu_quantized_decode_attention(
        res: *mut mlx_array,
        q: mlx_array,
        k_w: mlx_array,
        k_scales: mlx_array,
        k_biases: mlx_array,
        v_w: mlx_array,
        v_scales: mlx_array,
        v_biases: mlx_array,
        len: c_int,
        k_group: c_int,
        k_bits: c_int,
        v_group: c_int,
        v_bits: c_int,
        k_per_channel: bool,
        tail_k: mlx_array,
        tail_v: mlx_array,
        causal: bool,
        softcap: f32,
        ranges: *const c_int,
        n_ranges: c_int,
        s: mlx_stream,
    ) -> c_int;
    pub fn kvsplit_cpu_paged_decode_attention(
        res: *mut mlx_array,
        q: mlx_array,
        k_w: mlx_array,
        k_scales: mlx_array,
        k_biases: mlx_array,
        v_w: mlx_array,
        v_scales: mlx_array,
        v_biases: mlx_array,
        table: mlx_array,
        k_group: c_int,
        k_bits: c_int,
        v_group: c_int,
        v_bits: c_int,
        k_per_channel: bool,
        tail_k: mlx_array,
        tail_v: mlx_array,
        lead: c_int,
        softcap: f32,
        s: mlx_stream,
    ) -> c_int;
    pub fn kvsplit_cpu_rms_norm(res: *mut mlx_array, x: mlx_array, weight: mlx_array, eps: f32, s: mlx_stream) -> c_int;
    pub fn kvsplit_cpu_rope(
        res: *mut mlx_array,
        x: mlx_array,
        dims: c_int,
        traditional: bool,
        base: f32,
        scale: f32,
        offset: c_int,
        freqs: mlx_array,
        s: mlx_stream,
    ) -> c_int;
}

/// This thread's last error message from the C++ side.
pub fn last_error() -> String {
    unsafe { std::ffi::CStr::from_ptr(kvsplit_ext_last_error()).to_string_lossy().into_owned() }
}

/// The array an entry point `f` writes through its first argument; on failure, our message
/// after `what: `.
pub fn array_from(what: &str, f: impl FnOnce(&mut mlx_array) -> c_int) -> crate::Result<mlx_rs::Array> {
    unsafe {
        let mut out = mlx_sys::mlx_array_new();
        if f(&mut out) != 0 {
            mlx_sys::mlx_array_free(out);
            return Err(crate::ExtError::Primitive(format!("{what}: {}", last_error())));
        }
        Ok(mlx_rs::Array::from_ptr(out))
    }
}
