//! Fused split-precision decode attention on the GPU (flash-decoding style), in two kernels.
//!
//! Through MLX ops a decode step over a quantized cache is several kernels that each stream the
//! cache (scores, softmax, weighted sum). Here pass 1 ([`kernels/decode_partial.cu`]) reads the
//! packed keys at `BK` bits and packed values at `BV` bits with their 16-bit scales and biases
//! once: the token axis is split across blocks (one block per split and KV head, all GQA query
//! rows of the head in the block so each loaded key and value serves every row), and each warp
//! walks 32-token tiles with an online softmax. Pass 2 ([`kernels/decode_merge.cu`]) merges the
//! splits and writes the output in the query dtype, so a layer's decode attention is two
//! launches and nothing else.
//!
//! Pass 1 has two bodies. Where [`mma_applies`] (groups of 64, head_dim 64/128, 4/8-bit keys,
//! f16/bf16 queries), scores and value sums run on tensor cores (`mma.sync` m16n8k16, codes
//! turned into f16 through the mantissa of 1024.0); elsewhere lanes own whole tokens for the
//! scores and dim slices for the values on CUDA cores. docs/fused-attention-h200.md has the
//! layouts, the precision argument and the profiles.
//!
//! The decode step ([`decode_step`], what `KvCache::update_and_attend` uses for one new token)
//! goes further: pass 1 also quantizes the new token and writes it into the cache buffers in
//! place, and by default the last block of each head merges the splits, so a layer's whole
//! decode (cache write included) is one launch. On the GPU MLX's per-op host cost dominates
//! decode, which is why fewer ops per layer matter as much as kernel time
//! (docs/gpu-whole-model-h200.md).
//!
//! CUDA is compiled and checked on the H200 (`mlx_fast_cuda_kernel_*`);
//! `scripts/nvrtc-check-fused.py` compiles both kernels with NVRTC without a GPU. The Metal
//! twin ([`METAL_SOURCE`]) still has the structure of the first, single-pass kernel (a warp per
//! token, shuffle-reduced dot products); nothing here can run Metal, so it is untested and not
//! dispatched.

use crate::error::{KvError, Result};
use crate::attention::PackedOperand;
use mlx_rs::{Array, Dtype};
use std::ffi::CString;
use crate::env::Switch;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// Warps per block of pass 1; each walks every `WARPS`-th 32-token tile of the block's split.
const WARPS: i32 = 4;
/// Blocks of pass 1 to aim for on a 132-SM H200: every load of a tile is issued before its
/// arithmetic, so ptxas gives the D=128 kernels 160-240 registers per thread and two
/// 128-thread blocks fit an SM at once; 264 blocks are one full wave. Whole-model decode
/// measured 264 faster than 528 (two waves) at 32K and 128K (docs/gpu-whole-model-h200.md):
/// fewer splits also make the merge cheaper. Splits are never shorter than one tile per warp.
const TARGET_BLOCKS: usize = 264;

const COMMON: &str = include_str!("kernels/decode_common.cuh");
const PARTIAL: &str = include_str!("kernels/decode_partial.cu");
const MERGE: &str = include_str!("kernels/decode_merge.cu");

static POISON: AtomicBool = AtomicBool::new(false);

/// Host-side time spent in `KvCache::update_and_attend` and inside MLX's custom-kernel apply,
/// when `KVSPLIT_HOST_PROFILE=1` (for telling graph-building cost apart by layer part).
pub mod host_profile {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static LAYER_NS: AtomicU64 = AtomicU64::new(0);
    static APPLY_NS: AtomicU64 = AtomicU64::new(0);

    pub fn enabled() -> bool {
        static ON: OnceLock<bool> = OnceLock::new();
        *ON.get_or_init(|| std::env::var("KVSPLIT_HOST_PROFILE").is_ok_and(|v| v == "1"))
    }

    pub(crate) fn add_layer(ns: u64) {
        LAYER_NS.fetch_add(ns, Ordering::Relaxed);
    }

    pub(crate) fn add_apply(ns: u64) {
        APPLY_NS.fetch_add(ns, Ordering::Relaxed);
    }

    /// (seconds in update_and_attend, seconds in custom-kernel apply) since the last call.
    pub fn take() -> (f64, f64) {
        (LAYER_NS.swap(0, Ordering::Relaxed) as f64 * 1e-9, APPLY_NS.swap(0, Ordering::Relaxed) as f64 * 1e-9)
    }
}

/// Fill the kernels' outputs with NaN before they run, so an element a kernel fails to write
/// shows up as NaN (for correctness checks; it costs one fill per output, so it is off by
/// default).
pub fn poison_outputs(on: bool) {
    POISON.store(on, Ordering::Relaxed);
}

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


/// `KVSPLIT_FUSED=0` forces the MLX-ops attention path (for comparisons).
pub static FUSED: Switch = Switch::new("KVSPLIT_FUSED", true);
/// `KVSPLIT_FUSED_STEP=0` turns the fused decode step off: the MLX-ops cache write, then the
/// fused attention kernel ([`crate::KvCache::update_and_attend`]).
pub static STEP: Switch = Switch::new("KVSPLIT_FUSED_STEP", true);
/// `KVSPLIT_FUSED_FOLD=0` makes the decode step two launches (partial, then merge) instead of
/// one (the last block of each head merges its splits).
pub static FOLD: Switch = Switch::new("KVSPLIT_FUSED_FOLD", true);

/// Whether the fused kernel covers this case; otherwise the MLX-ops path runs
/// ([`FUSED`] off forces the MLX-ops path). head_dim must be a power of two
/// so that the lanes sharing a value dim slice are a power-of-two stride apart (they are
/// summed with xor shuffles).
pub fn applies(k_bits: u8, v_bits: u8, head_dim: usize, rows: usize) -> bool {
    let pow2 = |b: u8| matches!(b, 2 | 4 | 8);
    cfg!(not(target_os = "macos"))
        && FUSED.get()
        && crate::Backend::current() == crate::Backend::Gpu
        && pow2(k_bits)
        && pow2(v_bits)
        && matches!(head_dim, 32 | 64 | 128 | 256)
        && (1..=8).contains(&rows)
}

/// `KVSPLIT_FUSED_MMA=0` keeps the CUDA-core variant of the attention pass where the
/// tensor-core one applies (for comparisons).
pub static MMA: Switch = Switch::new("KVSPLIT_FUSED_MMA", true);

/// Whether the tensor-core variant of the attention pass (`KV_MMA` in decode_partial.cu) covers
/// this case: key and value groups of 64, head_dim 64 or 128, 4- or 8-bit keys, at most 8 query
/// rows per KV head, and f16 or bf16 queries (its query fragments are f16: an f32 query would
/// be rounded). Elsewhere the CUDA-core variant runs.
pub fn mma_applies(k: &PackedOperand, v: &PackedOperand, head_dim: usize, rows: usize, q_dtype: Dtype) -> bool {
    MMA.get() && mma_covers(k.bits, k.group, v.group, head_dim, rows, q_dtype)
}

/// The shapes [`mma_applies`] accepts, whatever [`MMA`] says (fused_check's error bounds).
pub fn mma_covers(k_bits: u8, k_group: usize, v_group: usize, head_dim: usize, rows: usize, q_dtype: Dtype) -> bool {
    k_group == 64
        && v_group == 64
        && matches!(head_dim, 64 | 128)
        && matches!(k_bits, 4 | 8)
        && (1..=8).contains(&rows)
        && matches!(q_dtype, Dtype::Float16 | Dtype::Bfloat16)
}

/// Dims each lane owns in the value pass: a power of two with at most 64 bits of codes per
/// lane and token (one 2-, 4- or 8-byte load) and at most 32 accumulators per lane
/// (`rows * dims`, so the kernel stays near 130 registers), but enough that 32 lanes cover
/// head_dim, at least 2 bytes of codes (the smallest load the kernel issues), and inside one value group (one scale and bias per lane and token).
pub fn value_dims(head_dim: usize, v_bits: u8, rows: usize, v_group: usize) -> usize {
    let cap = (64 / v_bits as usize).min(32 / rows.max(1)).max(1);
    let mut vd = 1;
    while vd * 2 <= cap {
        vd *= 2;
    }
    vd.max(head_dim / 32).max(16 / v_bits as usize).min(v_group).min(head_dim)
}

/// Token splits for `t` tokens over `heads` blocks rows: `(n_split, per)` with `per` a multiple
/// of 32 (whole tiles), every split non-empty, and `n_split * per >= t`.
pub fn split_plan(t: usize, heads: usize) -> (usize, usize) {
    let tile = 32 * WARPS as usize;
    // `KVSPLIT_FUSED_BLOCKS` overrides the target (for measuring split counts).
    static TARGET: OnceLock<usize> = OnceLock::new();
    let target = *TARGET.get_or_init(|| crate::env::positive("KVSPLIT_FUSED_BLOCKS").unwrap_or(TARGET_BLOCKS));
    let want = target.div_ceil(heads.max(1)).clamp(1, t.div_ceil(tile).max(1));
    let per = t.div_ceil(want).div_ceil(32) * 32;
    (t.div_ceil(per).max(1), per.max(32))
}

fn vec_string(names: &[&str]) -> mlx_sys::mlx_vector_string {
    unsafe {
        let v = mlx_sys::mlx_vector_string_new();
        for n in names {
            let c = CString::new(*n).expect("kernel argument names have no NUL");
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

/// One custom kernel: its source body and argument names.
struct KernelDef {
    stem: &'static str,
    /// Prepended to the body (`#define`s that pick a variant).
    defines: &'static str,
    body: &'static str,
    inputs: &'static [&'static str],
    outputs: &'static [&'static str],
}

const PARTIAL_DEF: KernelDef = KernelDef {
    stem: "kvsplit_attn_partial",
    defines: "#define KV_STEP 0\n",
    body: PARTIAL,
    inputs: &["q", "kw", "ks", "kb", "vw", "vs", "vb", "meta"],
    outputs: &["out_o", "out_m", "out_l"],
};
const MERGE_DEF: KernelDef = KernelDef {
    stem: "kvsplit_attn_merge",
    defines: "#define KV_STEP 0\n",
    body: MERGE,
    inputs: &["part_o", "part_m", "part_l", "meta"],
    outputs: &["out"],
};
const STEP_PARTIAL_DEF: KernelDef = KernelDef {
    stem: "kvsplit_step_partial",
    defines: "#define KV_STEP 1\n",
    body: PARTIAL,
    inputs: &["q", "knew", "vnew", "kw", "ks", "kb", "vw", "vs", "vb", "pos"],
    outputs: &["out_o", "out_m", "out_l"],
};
const STEP_FOLD_DEF: KernelDef = KernelDef {
    stem: "kvsplit_step_fold",
    defines: "#define KV_STEP 1\n#define KV_FOLD 1\n",
    body: PARTIAL,
    inputs: &["q", "knew", "vnew", "kw", "ks", "kb", "vw", "vs", "vb", "pos"],
    outputs: &["part", "out"],
};
const STEP_MERGE_DEF: KernelDef = KernelDef {
    stem: "kvsplit_step_merge",
    defines: "#define KV_STEP 1\n",
    body: MERGE,
    inputs: &["part_o", "part_m", "part_l", "pos"],
    outputs: &["out"],
};

/// A kernel object made once per definition and thread: `mlx_fast_cuda_kernel_new` scans the
/// source for every argument name (shape parameters) and copies it, which a decode step
/// should not pay twice per layer. Never freed: there are four, alive for the thread.
#[derive(Clone, Copy)]
struct KernelHandle {
    raw: mlx_sys::mlx_fast_cuda_kernel,
}

fn kernel_handle(def: &KernelDef, mma: bool) -> KernelHandle {
    thread_local! {
        static KERNELS: std::cell::RefCell<Vec<(&'static str, bool, KernelHandle)>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    KERNELS.with(|k| {
        if let Some((_, _, h)) = k.borrow().iter().find(|(s, m, _)| *s == def.stem && *m == mma) {
            return *h;
        }
        let source = [def.defines, if mma { "#define KV_MMA 1\n" } else { "" }, def.body].concat();
        // Kernel names carry a hash of the source: MLX caches compiled kernels on disk by
        // name (`/tmp/mlx/<version>/ptx`), so a changed source under an old name would run
        // stale code.
        let hash = [COMMON, &source].concat().bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
        let name = CString::new(format!("{}_{hash:016x}", def.stem)).expect("kernel names have no NUL");
        let (header, source) = match include_files(def, &source, hash) {
            Some(small) => small,
            None => (COMMON.to_string(), source),
        };
        let source = CString::new(source).expect("kernel sources have no NUL");
        let header = CString::new(header).expect("kernel sources have no NUL");
        let (ins, outs) = (vec_string(def.inputs), vec_string(def.outputs));
        // ensure_row_contiguous: the kernels index flat buffers; contiguous inputs pass as is
        // (the step kernel writes into the cache buffers it is given, which are contiguous by
        // construction: see `KvCache::fused_step`).
        let raw = unsafe { mlx_sys::mlx_fast_cuda_kernel_new(name.as_ptr(), ins, outs, source.as_ptr(), header.as_ptr(), true, 0) };
        unsafe {
            mlx_sys::mlx_vector_string_free(ins);
            mlx_sys::mlx_vector_string_free(outs);
        }
        let h = KernelHandle { raw };
        k.borrow_mut().push((def.stem, mma, h));
        h
    })
}

/// The kernel's header and body written to files once, and the `#include` lines that stand
/// for them: MLX rebuilds a custom kernel's full source text (header + body, ~15 KB here) on
/// every call, which costs host time twice per layer and decode step; NVRTC reads the files
/// only when it compiles. The body line names the shape parameters the body uses, because
/// MLX passes an input's shape only when the source text mentions `<input>_shape`.
/// `None` (inline sources) if the files cannot be written.
fn include_files(def: &KernelDef, source: &str, hash: u64) -> Option<(String, String)> {
    let dir = std::env::temp_dir().join(format!("kvsplit-kernels-{hash:016x}"));
    let write = |name: &str, text: &str| -> Option<String> {
        let path = dir.join(name);
        if std::fs::read_to_string(&path).ok().as_deref() != Some(text) {
            std::fs::create_dir_all(&dir).ok()?;
            let tmp = dir.join(format!("{name}.{}.tmp", std::process::id()));
            std::fs::write(&tmp, text).ok()?;
            std::fs::rename(&tmp, &path).ok()?;
        }
        let path = path.to_str()?.to_string();
        (!path.contains('"')).then_some(path)
    };
    let header = write("common.cuh", COMMON)?;
    let body = write(&format!("{}.cu", def.stem), source)?;
    let shapes: Vec<String> = def.inputs.iter().map(|n| format!("{n}_shape")).filter(|n| source.contains(n.as_str())).collect();
    Some((format!("#include \"{header}\"\n"), format!("// uses: {}\n#include \"{body}\"\n", shapes.join(" "))))
}

/// Template arguments by name; names are `'static` and turned into C strings once.
fn c_name(n: &'static str) -> &'static std::ffi::CStr {
    static NAMES: OnceLock<std::sync::Mutex<Vec<(&'static str, &'static std::ffi::CStr)>>> = OnceLock::new();
    let mut names = NAMES.get_or_init(Default::default).lock().expect("name table");
    if let Some((_, c)) = names.iter().find(|(s, _)| *s == n) {
        return c;
    }
    let c: &'static std::ffi::CStr = Box::leak(CString::new(n).expect("template names have no NUL").into_boxed_c_str());
    names.push((n, c));
    c
}

/// One output of a custom kernel.
struct Out<'a> {
    shape: &'a [i32],
    dtype: Dtype,
}

/// Runs a custom CUDA kernel on the default GPU stream. `grid` counts threads (MLX divides it
/// by `threads`), as in Metal's dispatchThreads. `inputs` and `outputs` follow `def`'s names;
/// `mma` picks the tensor-core variant of the attention pass.
#[allow(clippy::too_many_arguments)]
fn run_kernel(
    def: &KernelDef,
    mma: bool,
    inputs: &[&Array],
    outputs: &[Out],
    grid: (i32, i32),
    threads: i32,
    ints: &[(&'static str, i32)],
    types: &[(&'static str, Dtype)],
) -> Result<Vec<Array>> {
    debug_assert_eq!(inputs.len(), def.inputs.len());
    debug_assert_eq!(outputs.len(), def.outputs.len());
    let kernel = kernel_handle(def, mma);
    let dtype = |d: Dtype| d as mlx_sys::mlx_dtype;
    let poison = POISON.load(Ordering::Relaxed);
    // Launch configurations repeat from layer to layer and step to step (the split count
    // changes rarely): build each once per thread.
    let mut key: Vec<i64> = vec![def.stem.as_ptr() as i64, mma as i64, poison as i64, grid.0 as i64, grid.1 as i64, threads as i64];
    key.extend(ints.iter().map(|(_, v)| *v as i64));
    key.extend(types.iter().map(|(_, d)| *d as i64));
    for o in outputs {
        key.push(o.dtype as i64);
        key.push(o.shape.len() as i64);
        key.extend(o.shape.iter().map(|&x| x as i64));
    }
    thread_local! {
        static CONFIGS: std::cell::RefCell<std::collections::HashMap<Vec<i64>, ConfigHandle>> = Default::default();
    }
    let cached = CONFIGS.with(|c| c.borrow().get(&key).copied());
    unsafe {
        let cfg = match cached {
            Some(c) => c.raw,
            None => {
                let cfg = mlx_sys::mlx_fast_cuda_kernel_config_new();
                let built = (|| -> Result<()> {
                    for o in outputs {
                        check(mlx_sys::mlx_fast_cuda_kernel_config_add_output_arg(cfg, o.shape.as_ptr(), o.shape.len(), dtype(o.dtype)), "output")?;
                    }
                    check(mlx_sys::mlx_fast_cuda_kernel_config_set_grid(cfg, grid.0, grid.1, 1), "grid")?;
                    check(mlx_sys::mlx_fast_cuda_kernel_config_set_thread_group(cfg, threads, 1, 1), "thread group")?;
                    if poison {
                        check(mlx_sys::mlx_fast_cuda_kernel_config_set_init_value(cfg, f32::NAN), "init value")?;
                    }
                    for (n, val) in ints {
                        check(mlx_sys::mlx_fast_cuda_kernel_config_add_template_arg_int(cfg, c_name(n).as_ptr(), *val), "template arg")?;
                    }
                    for (n, d) in types {
                        check(mlx_sys::mlx_fast_cuda_kernel_config_add_template_arg_dtype(cfg, c_name(n).as_ptr(), dtype(*d)), "template dtype")?;
                    }
                    Ok(())
                })();
                if let Err(e) = built {
                    mlx_sys::mlx_fast_cuda_kernel_config_free(cfg);
                    return Err(e);
                }
                CONFIGS.with(|c| {
                    let mut c = c.borrow_mut();
                    // Bounded: shapes that stop recurring (other depths, other models) are
                    // dropped all at once.
                    if c.len() >= 256 {
                        for (_, old) in c.drain() {
                            mlx_sys::mlx_fast_cuda_kernel_config_free(old.raw);
                        }
                    }
                    c.insert(key, ConfigHandle { raw: cfg });
                });
                cfg
            }
        };
        {
            let ins = mlx_sys::mlx_vector_array_new();
            for a in inputs {
                mlx_sys::mlx_vector_array_append_value(ins, a.as_ptr());
            }
            let mut outs = mlx_sys::mlx_vector_array_new();
            let stream = mlx_sys::mlx_default_gpu_stream_new();
            let t0 = host_profile::enabled().then(std::time::Instant::now);
            let rc = mlx_sys::mlx_fast_cuda_kernel_apply(&mut outs, kernel.raw, ins, cfg, stream);
            if let Some(t0) = t0 {
                host_profile::add_apply(t0.elapsed().as_nanos() as u64);
            }
            mlx_sys::mlx_stream_free(stream);
            mlx_sys::mlx_vector_array_free(ins);
            if rc != 0 {
                mlx_sys::mlx_vector_array_free(outs);
                return Err(KvError::Shape(format!("fused decode attention: {} kernel apply failed", def.stem)));
            }
            let mut got = Vec::with_capacity(outputs.len());
            for i in 0..outputs.len() {
                let mut a = mlx_sys::mlx_array_new();
                mlx_sys::mlx_vector_array_get(&mut a, outs, i);
                got.push(Array::from_ptr(a));
            }
            mlx_sys::mlx_vector_array_free(outs);
            Ok(got)
        }
    }
}

/// A launch configuration kept for reuse (see [`run_kernel`]).
#[derive(Clone, Copy)]
struct ConfigHandle {
    raw: mlx_sys::mlx_fast_cuda_kernel_config,
}

/// The query scale as a template argument (its f32 bits): one value per model, so one
/// compiled variant, and no multiply op per layer.
fn scale_bits(scale: f32) -> i32 {
    scale.to_bits() as i32
}

/// The template arguments every attention kernel variant is compiled for.
fn shape_args(d: i32, k: &PackedOperand, v: &PackedOperand, rows: i32, vd: usize, scale: f32) -> [(&'static str, i32); 9] {
    [
        ("D", d),
        ("BK", k.bits as i32),
        ("BV", v.bits as i32),
        ("GK", k.group as i32),
        ("GV", v.group as i32),
        ("REP", rows),
        ("WARPS", WARPS),
        ("VD", vd as i32),
        ("SCALE_BITS", scale_bits(scale)),
    ]
}
/// Decode attention of `q3` (`[BH, rows, D]`, already scaled) over `t` tokens of the packed
/// bodies. Returns `[BH, rows, D]` in `q3`'s dtype.
pub fn decode_attention(q3: &Array, k: PackedOperand, v: PackedOperand, t: usize, cap: usize) -> Result<Array> {
    let s = q3.shape();
    let (bh, rows, d) = (s[0], s[1], s[2]);
    if t == 0 || t > cap {
        return Err(KvError::Capacity { requested: t, capacity: cap });
    }
    let (n_split, per) = split_plan(t, bh as usize);
    let vd = value_dims(d as usize, v.bits, rows as usize, v.group);
    let meta = Array::from_slice(&[t as i32, cap as i32, per as i32, n_split as i32], &[4]);
    let ns = n_split as i32;
    let mma = mma_applies(&k, &v, d as usize, rows as usize, q3.dtype());
    let parts = run_kernel(
        &PARTIAL_DEF,
        mma,
        &[q3, &k.full.w, &k.full.scales, &k.full.biases, &v.full.w, &v.full.scales, &v.full.biases, &meta],
        &[
            Out { shape: &[bh, ns, rows, d], dtype: Dtype::Float32 },
            Out { shape: &[bh, ns, rows], dtype: Dtype::Float32 },
            Out { shape: &[bh, ns, rows], dtype: Dtype::Float32 },
        ],
        (ns * 32 * WARPS, bh),
        32 * WARPS,
        &shape_args(d, &k, &v, rows, vd, 1.0),
        &[],
    )?;
    let out = run_kernel(
        &MERGE_DEF,
        false,
        &[&parts[0], &parts[1], &parts[2], &meta],
        &[Out { shape: &[bh, rows, d], dtype: q3.dtype() }],
        (d, bh * rows),
        d,
        &[("D", d), ("REP", rows)],
        &[("OT", q3.dtype())],
    )?;
    Ok(out.into_iter().next().expect("the merge kernel has one output"))
}

/// One decode step of a layer in two launches and no other op: the new token's key and value
/// (`k_new`, `v_new`: `[B, Hkv, 1, D]`) are quantized on the GPU and written in place into
/// slot `t - 1` of the cache buffers (`k.full`, `v.full`, capacity `cap`), then attention of
/// `q` (`[B, Hq, 1, D]`, unscaled) over the `t` tokens runs as in [`decode_attention`].
///
/// `pos` is an int32 device array of 1024 elements: `pos[0]` must hold `t - 1`, the rest 0
/// (arrival counters of the one-launch variant); the step adds one to `pos[0]`, so the step after needs no host-made array (a fresh host array per layer and
/// step would be a managed-memory upload each time). Writing into arrays MLX treats as inputs
/// is sound here because the cache owns them, nothing else reads them in the same graph, and
/// MLX runs the step's launches in data order (every later reader depends on this step's
/// output). Returns `[B, Hq, 1, D]` in `q`'s dtype.
#[allow(clippy::too_many_arguments)]
pub fn decode_step(q: &Array, k_new: &Array, v_new: &Array, k: PackedOperand, v: PackedOperand, pos: &Array, t: usize, cap: usize, scale: f32) -> Result<Array> {
    let s = q.shape();
    let (b, hq, l, d) = (s[0], s[1], s[2], s[3]);
    let hkv = k_new.shape()[1];
    if l != 1 || hq % hkv != 0 {
        return Err(KvError::Shape(format!("fused decode step: q {s:?} with {hkv} KV heads")));
    }
    if t == 0 || t > cap {
        return Err(KvError::Capacity { requested: t, capacity: cap });
    }
    let (bh, rows) = (b * hkv, hq / hkv);
    let (n_split, _) = split_plan(t, bh as usize);
    let vd = value_dims(d as usize, v.bits, rows as usize, v.group);
    let ns = n_split as i32;
    let ints = shape_args(d, &k, &v, rows, vd, scale);
    let mma = mma_applies(&k, &v, d as usize, rows as usize, q.dtype());
    let inputs = [q, k_new, v_new, &k.full.w, &k.full.scales, &k.full.biases, &v.full.w, &v.full.scales, &v.full.biases, pos];
    let parts_out = [
        Out { shape: &[bh, ns, rows, d], dtype: Dtype::Float32 },
        Out { shape: &[bh, ns, rows], dtype: Dtype::Float32 },
        Out { shape: &[bh, ns, rows], dtype: Dtype::Float32 },
    ];
    // One launch: the last block of each head merges its splits (split weights are staged in
    // the kernel's WARPS * D shared floats; arrival counters live in pos[1..1023]).
    if FOLD.get() && n_split <= (WARPS * d) as usize && bh < 1022 {
        let out = run_kernel(
            &STEP_FOLD_DEF,
            mma,
            &inputs,
            &[Out { shape: &[bh * ns * rows * (d + 2)], dtype: Dtype::Float32 }, Out { shape: &[b, hq, 1, d], dtype: q.dtype() }],
            (ns * 32 * WARPS, bh),
            32 * WARPS,
            &ints,
            &[("OT", q.dtype())],
        )?;
        return Ok(out.into_iter().nth(1).expect("the fold kernel has two outputs"));
    }
    let parts = run_kernel(&STEP_PARTIAL_DEF, mma, &inputs, &parts_out, (ns * 32 * WARPS, bh), 32 * WARPS, &ints, &[])?;
    let out = run_kernel(
        &STEP_MERGE_DEF,
        false,
        &[&parts[0], &parts[1], &parts[2], pos],
        &[Out { shape: &[b, hq, 1, d], dtype: q.dtype() }],
        (d, bh * rows),
        d,
        &[("D", d), ("REP", rows)],
        &[("OT", q.dtype())],
    )?;
    Ok(out.into_iter().next().expect("the merge kernel has one output"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_plan_covers_every_token_once_in_whole_tiles() {
        for heads in [1usize, 8, 32] {
            for t in [1usize, 31, 32, 33, 127, 128, 129, 1000, 4096, 5000, 32768, 131072, 131073] {
                let (n, per) = split_plan(t, heads);
                assert_eq!(per % 32, 0, "t={t} heads={heads}");
                assert!(n * per >= t, "t={t} heads={heads}: {n} x {per} misses tokens");
                assert!((n - 1) * per < t, "t={t} heads={heads}: split {} is empty", n - 1);
                assert!(n * heads <= TARGET_BLOCKS.max(heads) + heads, "t={t} heads={heads}: {n} splits");
            }
        }
    }

    #[test]
    fn kernel_sources_travel_as_include_lines_that_name_their_shape_parameters() {
        let source = [STEP_PARTIAL_DEF.defines, STEP_PARTIAL_DEF.body].concat();
        let (header, body) = include_files(&STEP_PARTIAL_DEF, &source, 1).expect("temp dir is writable");
        assert!(header.starts_with("#include \"") && header.len() < 200, "{header}");
        assert!(body.contains("kw_shape") && body.len() < 300, "{body}");
        let path = body.split('"').nth(1).unwrap();
        assert_eq!(std::fs::read_to_string(path).unwrap(), source);
        let (_, merge) = include_files(&STEP_MERGE_DEF, &[STEP_MERGE_DEF.defines, STEP_MERGE_DEF.body].concat(), 1).unwrap();
        assert!(merge.contains("part_m_shape"), "{merge}");
    }

    #[test]
    fn value_dims_fit_the_lanes_and_the_groups() {
        for d in [32usize, 64, 128, 256] {
            for bits in [2u8, 4, 8] {
                for rows in 1..=8usize {
                    for group in [32usize, 64, 128].into_iter().filter(|g| *g <= d) {
                        let vd = value_dims(d, bits, rows, group);
                        assert!(vd.is_power_of_two() && d % vd == 0, "d={d} vd={vd}");
                        assert!(d / vd <= 32, "d={d} vd={vd}: more than 32 lanes per token");
                        assert!(group % vd == 0, "vd={vd} straddles groups of {group}");
                        let bytes = vd * bits as usize / 8;
                        assert!(matches!(bytes, 2 | 4 | 8), "d={d} bits={bits} rows={rows}: {bytes}-byte value load");
                        assert!(rows * vd <= 64, "d={d} rows={rows} vd={vd}: too many accumulators");
                    }
                }
            }
        }
    }
}
