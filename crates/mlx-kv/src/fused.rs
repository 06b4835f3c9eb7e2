//! Fused split-precision decode attention on the GPU (flash-decoding style).
//!
//! Through MLX ops a decode step over a quantized cache is several kernels that each stream the
//! cache (scores, softmax, weighted sum). This kernel reads packed keys at `BK` bits and packed
//! values at `BV` bits with their 16-bit scales and biases once: each warp walks tokens, every
//! lane owns `D/32` dims, dot products are reduced with warp shuffles, and an online softmax
//! keeps a running max and denominator. The token axis is split across blocks for occupancy;
//! a small merge in MLX ops combines the splits.
//!
//! CUDA is compiled and checked on the H200 (`mlx_fast_cuda_kernel_*`). The Metal twin
//! ([`METAL_SOURCE`]) has the same structure for `mlx_fast_metal_kernel_*`; nothing here can run
//! Metal, so it is untested and not dispatched.

use crate::error::{KvError, Result};
use crate::store::Packed;
use mlx_rs::ops::exp;
use mlx_rs::{Array, Dtype};
use std::ffi::CString;

/// Warps per block; each walks every `WARPS`-th token of the block's split.
const WARPS: i32 = 4;

const CUDA_SOURCE: &str = r#"
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int split = blockIdx.x;
    const int bh = blockIdx.y;
    const int n_split = gridDim.x;
    const int T = meta[0];
    const int CAP = meta[1];
    const int per = (T + n_split - 1) / n_split;
    const int t0 = split * per;
    const int t1 = min(T, t0 + per);
    constexpr int DPL = D / 32;
    constexpr int KW = D * BK / 32;
    constexpr int VW = D * BV / 32;
    constexpr int KG = D / GK;
    constexpr int VG = D / GV;
    constexpr unsigned KMASK = (1u << BK) - 1u;
    constexpr unsigned VMASK = (1u << BV) - 1u;
    const int d0 = lane * DPL;

    float qv[REP][DPL];
    float m[REP], l[REP], acc[REP][DPL];
    for (int r = 0; r < REP; ++r) {
        m[r] = -KV_INF; l[r] = 0.f;
        for (int i = 0; i < DPL; ++i) {
            qv[r][i] = q[(bh * REP + r) * D + d0 + i];
            acc[r][i] = 0.f;
        }
    }
    // Two tokens per iteration: their loads are independent, which keeps more memory requests
    // in flight per warp (the loop is latency-bound otherwise).
    for (int t = t0 + warp; t < t1; t += 2 * WARPS) {
        const bool two = t + WARPS < t1;
        float kd[2][DPL], vd[2][DPL];
        for (int u = 0; u < 2; ++u) {
            const int tt = (u == 0 || two) ? t + u * WARPS : t;
            const size_t row = (size_t)bh * CAP + tt;
            const unsigned* krow = kw + row * KW;
            const unsigned* vrow = vw + row * VW;
            for (int i = 0; i < DPL; ++i) {
                const int j = d0 + i;
                const int kb_ = j * BK, vb_ = j * BV;
                const float kq = (float)((krow[kb_ >> 5] >> (kb_ & 31)) & KMASK);
                const float vq = (float)((vrow[vb_ >> 5] >> (vb_ & 31)) & VMASK);
                kd[u][i] = __half2float(ks[row * KG + j / GK]) * kq + __half2float(kb[row * KG + j / GK]);
                vd[u][i] = __half2float(vs[row * VG + j / GV]) * vq + __half2float(vb[row * VG + j / GV]);
            }
        }
        for (int u = 0; u < (two ? 2 : 1); ++u) {
            for (int r = 0; r < REP; ++r) {
                float s = 0.f;
                for (int i = 0; i < DPL; ++i) s += qv[r][i] * kd[u][i];
                for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
                const float m_new = fmaxf(m[r], s);
                const float alpha = __expf(m[r] - m_new);
                const float p = __expf(s - m_new);
                l[r] = l[r] * alpha + p;
                for (int i = 0; i < DPL; ++i) acc[r][i] = acc[r][i] * alpha + p * vd[u][i];
                m[r] = m_new;
            }
        }
    }
    __shared__ float sm_m[WARPS][REP];
    __shared__ float sm_l[WARPS][REP];
    __shared__ float sm_o[WARPS][REP][D];
    for (int r = 0; r < REP; ++r) {
        for (int i = 0; i < DPL; ++i) sm_o[warp][r][d0 + i] = acc[r][i];
        if (lane == 0) { sm_m[warp][r] = m[r]; sm_l[warp][r] = l[r]; }
    }
    __syncthreads();
    if (warp == 0) {
        for (int r = 0; r < REP; ++r) {
            float M = -KV_INF;
            for (int w = 0; w < WARPS; ++w) M = fmaxf(M, sm_m[w][r]);
            float L = 0.f;
            float O[DPL];
            for (int i = 0; i < DPL; ++i) O[i] = 0.f;
            if (M > -KV_INF) {
                for (int w = 0; w < WARPS; ++w) {
                    const float c = __expf(sm_m[w][r] - M);
                    L += sm_l[w][r] * c;
                    for (int i = 0; i < DPL; ++i) O[i] += sm_o[w][r][d0 + i] * c;
                }
            }
            const size_t o = ((size_t)bh * n_split + split) * REP + r;
            for (int i = 0; i < DPL; ++i) out_o[o * D + d0 + i] = O[i];
            if (lane == 0) { out_m[o] = M; out_l[o] = L; }
        }
    }
"#;

/// The same algorithm for Metal (simdgroup = warp). Untested: no Mac runs our CI.
pub const METAL_SOURCE: &str = r#"
    // Structure mirrors CUDA_SOURCE: threadgroup (split, bh), 4 simdgroups of 32 lanes, lane
    // owns D/32 dims, simd_sum for the dot product, online softmax, threadgroup merge.
    const int lane = thread_index_in_simdgroup;
    const int warp = simdgroup_index_in_threadgroup;
    const int split = threadgroup_position_in_grid.x;
    const int bh = threadgroup_position_in_grid.y;
    const int n_split = threadgroups_per_grid.x;
    const int T = meta[0];
    const int CAP = meta[1];
    const int per = (T + n_split - 1) / n_split;
    const int t0 = split * per;
    const int t1 = min(T, t0 + per);
    const int DPL = D / 32;
    const int d0 = lane * DPL;
    float qv[REP][D / 32], acc[REP][D / 32], m[REP], l[REP];
    for (int r = 0; r < REP; ++r) {
        m[r] = -INFINITY; l[r] = 0.f;
        for (int i = 0; i < DPL; ++i) { qv[r][i] = q[(bh * REP + r) * D + d0 + i]; acc[r][i] = 0.f; }
    }
    for (int t = t0 + warp; t < t1; t += 4) {
        const size_t row = (size_t)bh * CAP + t;
        float kd[D / 32], vd[D / 32];
        for (int i = 0; i < DPL; ++i) {
            const int j = d0 + i;
            const uint kq = (kw[row * (D * BK / 32) + ((j * BK) >> 5)] >> ((j * BK) & 31)) & ((1u << BK) - 1u);
            const uint vq = (vw[row * (D * BV / 32) + ((j * BV) >> 5)] >> ((j * BV) & 31)) & ((1u << BV) - 1u);
            kd[i] = float(ks[row * (D / GK) + j / GK]) * float(kq) + float(kb[row * (D / GK) + j / GK]);
            vd[i] = float(vs[row * (D / GV) + j / GV]) * float(vq) + float(vb[row * (D / GV) + j / GV]);
        }
        for (int r = 0; r < REP; ++r) {
            float s = 0.f;
            for (int i = 0; i < DPL; ++i) s += qv[r][i] * kd[i];
            s = simd_sum(s);
            const float m_new = max(m[r], s);
            const float alpha = exp(m[r] - m_new), p = exp(s - m_new);
            l[r] = l[r] * alpha + p;
            for (int i = 0; i < DPL; ++i) acc[r][i] = acc[r][i] * alpha + p * vd[i];
            m[r] = m_new;
        }
    }
    threadgroup float sm_m[4][REP], sm_l[4][REP], sm_o[4][REP][D];
    for (int r = 0; r < REP; ++r) {
        for (int i = 0; i < DPL; ++i) sm_o[warp][r][d0 + i] = acc[r][i];
        if (lane == 0) { sm_m[warp][r] = m[r]; sm_l[warp][r] = l[r]; }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (warp == 0) {
        for (int r = 0; r < REP; ++r) {
            float M = -INFINITY, L = 0.f, O[D / 32];
            for (int w = 0; w < 4; ++w) M = max(M, sm_m[w][r]);
            for (int i = 0; i < DPL; ++i) O[i] = 0.f;
            if (M > -INFINITY) {
                for (int w = 0; w < 4; ++w) {
                    const float c = exp(sm_m[w][r] - M);
                    L += sm_l[w][r] * c;
                    for (int i = 0; i < DPL; ++i) O[i] += sm_o[w][r][d0 + i] * c;
                }
            }
            const size_t o = ((size_t)bh * n_split + split) * REP + r;
            for (int i = 0; i < DPL; ++i) out_o[o * D + d0 + i] = O[i];
            if (lane == 0) { out_m[o] = M; out_l[o] = L; }
        }
    }
"#;

/// A packed K or V body with its full capacity (the kernel indexes `[BH, CAP, ...]` rows).
pub struct FusedOperand<'a> {
    pub full: &'a Packed,
    pub bits: u8,
    pub group: usize,
}

/// Whether the fused kernel covers this case; otherwise the MLX-ops path runs.
/// `KVSPLIT_FUSED=0` forces the MLX-ops path (for comparisons).
pub fn applies(k_bits: u8, v_bits: u8, head_dim: usize, rows: usize) -> bool {
    let pow2 = |b: u8| matches!(b, 2 | 4 | 8);
    cfg!(not(target_os = "macos"))
        && std::env::var("KVSPLIT_FUSED").map_or(true, |v| v != "0")
        && crate::Backend::current() == crate::Backend::Gpu
        && pow2(k_bits)
        && pow2(v_bits)
        && head_dim.is_multiple_of(32)
        && (32..=256).contains(&head_dim)
        && (1..=8).contains(&rows)
}

fn vec_string(names: &[&str]) -> mlx_sys::mlx_vector_string {
    unsafe {
        let v = mlx_sys::mlx_vector_string_new();
        for n in names {
            let c = CString::new(*n).unwrap();
            mlx_sys::mlx_vector_string_append_value(v, c.as_ptr());
        }
        v
    }
}

fn check(rc: i32, what: &str) -> Result<()> {
    if rc != 0 {
        return Err(KvError::Shape(format!("fused decode attention: {what} failed")));
    }
    Ok(())
}

/// Decode attention of `q3` (`[BH, rows, D]`, already scaled) over `t` tokens of the packed
/// bodies. Returns `[BH, rows, D]` in f32.
pub fn decode_attention(q3: &Array, k: FusedOperand, v: FusedOperand, t: usize, cap: usize) -> Result<Array> {
    let s = q3.shape();
    let (bh, rows, d) = (s[0], s[1], s[2]);
    // About eight blocks per SM on a 132-SM card (the loop is latency-bound, so occupancy is
    // what buys bandwidth), but at least 64 tokens per split.
    let n_split = ((1056 + bh - 1) / bh).clamp(1, (t.div_ceil(64) as i32).max(1));
    let q = q3.as_dtype(Dtype::Float32)?;
    let meta = Array::from_slice(&[t as i32, cap as i32], &[2]);
    let inputs = [&q, &k.full.w, &k.full.scales, &k.full.biases, &v.full.w, &v.full.scales, &v.full.biases, &meta];
    let name = CString::new("kvsplit_decode_attn").unwrap();
    let source = CString::new(CUDA_SOURCE).unwrap();
    // NVRTC sees no <cmath>: spell infinity by its bit pattern.
    let header = CString::new("#define KV_INF __int_as_float(0x7f800000)\n").unwrap();
    let in_names = vec_string(&["q", "kw", "ks", "kb", "vw", "vs", "vb", "meta"]);
    let out_names = vec_string(&["out_o", "out_m", "out_l"]);
    let outputs = unsafe {
        let kernel = mlx_sys::mlx_fast_cuda_kernel_new(name.as_ptr(), in_names, out_names, source.as_ptr(), header.as_ptr(), false, 0);
        let cfg = mlx_sys::mlx_fast_cuda_kernel_config_new();
        let o_shape = [bh, n_split, rows, d];
        let m_shape = [bh, n_split, rows];
        check(mlx_sys::mlx_fast_cuda_kernel_config_add_output_arg(cfg, o_shape.as_ptr(), 4, mlx_sys::mlx_dtype__MLX_FLOAT32), "output o")?;
        check(mlx_sys::mlx_fast_cuda_kernel_config_add_output_arg(cfg, m_shape.as_ptr(), 3, mlx_sys::mlx_dtype__MLX_FLOAT32), "output m")?;
        check(mlx_sys::mlx_fast_cuda_kernel_config_add_output_arg(cfg, m_shape.as_ptr(), 3, mlx_sys::mlx_dtype__MLX_FLOAT32), "output l")?;
        check(mlx_sys::mlx_fast_cuda_kernel_config_set_grid(cfg, n_split * 32 * WARPS, bh, 1), "grid")?;
        check(mlx_sys::mlx_fast_cuda_kernel_config_set_thread_group(cfg, 32 * WARPS, 1, 1), "thread group")?;
        // Poison: an output element the kernel fails to write shows up as NaN.
        check(mlx_sys::mlx_fast_cuda_kernel_config_set_init_value(cfg, f32::NAN), "init value")?;
        for (n, val) in [("D", d), ("BK", k.bits as i32), ("BV", v.bits as i32), ("GK", k.group as i32), ("GV", v.group as i32), ("REP", rows), ("WARPS", WARPS)] {
            let c = CString::new(n).unwrap();
            check(mlx_sys::mlx_fast_cuda_kernel_config_add_template_arg_int(cfg, c.as_ptr(), val), "template arg")?;
        }
        let ins = mlx_sys::mlx_vector_array_new();
        for a in inputs {
            mlx_sys::mlx_vector_array_append_value(ins, a.as_ptr());
        }
        let mut outs = mlx_sys::mlx_vector_array_new();
        let stream = mlx_sys::mlx_default_gpu_stream_new();
        let rc = mlx_sys::mlx_fast_cuda_kernel_apply(&mut outs, kernel, ins, cfg, stream);
        mlx_sys::mlx_stream_free(stream);
        mlx_sys::mlx_vector_array_free(ins);
        mlx_sys::mlx_fast_cuda_kernel_config_free(cfg);
        mlx_sys::mlx_fast_cuda_kernel_free(kernel);
        mlx_sys::mlx_vector_string_free(in_names);
        mlx_sys::mlx_vector_string_free(out_names);
        check(rc, "kernel apply")?;
        let mut got = Vec::new();
        for i in 0..3 {
            let mut a = mlx_sys::mlx_array_new();
            mlx_sys::mlx_vector_array_get(&mut a, outs, i);
            got.push(Array::from_ptr(a));
        }
        mlx_sys::mlx_vector_array_free(outs);
        got
    };
    let (o, m, l) = (&outputs[0], &outputs[1], &outputs[2]);
    // Merge the splits: weights exp(m_s - max m).
    let mmax = m.max_axis(1, true)?;
    let w = exp(&(m - &mmax))?;
    let den = (l * &w).sum_axis(1, false)?;
    let num = (o * w.expand_dims(-1)?).sum_axis(1, false)?;
    Ok(num / den.expand_dims(-1)?)
}
