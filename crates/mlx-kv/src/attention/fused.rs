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
//! Keys and values may each be 2, 3, 4, 6 or 8 bits ([`covers`]), packed as MLX packs them: 3-
//! and 6-bit codes form a little-endian bit stream (8 or 4 codes to 3 bytes), so some straddle
//! two u32 words.
//!
//! Pass 1 has two bodies. Where [`mma_applies`] (groups of 64, head_dim 64/128, 4/8-bit keys,
//! 2/4/8-bit values, f16/bf16 queries), scores and value sums run on tensor cores (`mma.sync`
//! m16n8k16, codes turned into f16 through the mantissa of 1024.0); elsewhere, 3- and 6-bit
//! widths included, lanes own whole tokens for the scores and dim slices for the values on CUDA
//! cores. docs/fused-attention-h200.md has the
//! layouts, the precision argument and the profiles.
//!
//! The decode step ([`decode_step`], what `KvCache::update_and_attend` uses for one new token)
//! goes further: pass 1 also quantizes the new token and writes it into the cache buffers in
//! place, and by default the last block of each head merges the splits, so a layer's whole
//! decode (cache write included) is one launch. On the GPU MLX's per-op host cost dominates
//! decode, which is why fewer ops per layer matter as much as kernel time
//! (docs/gpu-whole-model-h200.md).
//!
//! [`decode_step_paged`] is the same step for a batch of sequences whose caches live in a
//! block pool (`KV_PAGED`): one launch per layer for all of them, rows found through a block
//! table, each sequence's length read from that table on the GPU.
//!
//! [`attend_channels`] reads per-channel keys (codes along tokens, one scale per channel and
//! group of tokens), the float sink tokens kept out of the body (`--kv-sinks`), and the float
//! tail of tokens that do not fill a key group yet, in one softmax (`kernels/decode_channels.cu`, then the same merge). [`step_channels`] is its decode
//! step: the same kernel (`KV_CSTEP`) writes the new token's K and V into the cache's float
//! tail buffers in place (read whole, so MLX makes no contiguity copy), can apply the layer's
//! Hadamard rotations itself (query and new token in, output out in the fold), and merges in
//! the same launch; a token that completes a key group still goes through MLX ops (the group
//! is quantized as a whole). Per-channel keys have no paged kernel: a pooled per-channel cache
//! attends over its gathered blocks.
//!
//! CUDA is compiled and checked on the H200 (`mlx_fast_cuda_kernel_*`);
//! `scripts/nvrtc-check-fused.py` compiles both kernels with NVRTC without a GPU. There is no
//! Metal kernel: on Metal the dispatcher runs the MLX-ops path, which MLX implements there. A
//! fused Metal kernel returns only when a Mac can test it.

use super::types::{ChannelBody, PackedOperand};
use crate::error::{KvError, Result};
use mlx_rs::{Array, Dtype};
use mlx_ext::cuda_kernel::{run_kernel, KernelDef, Out};

pub use mlx_ext::cuda_kernel::poison_outputs;

/// Warps per block of pass 1; each walks every `WARPS`-th 32-token tile of the block's split.
const WARPS: i32 = 4;
/// Blocks of pass 1 to aim for on a 132-SM H200 (`--gpu-fused-blocks`,
/// [`mlx_ext::options::DEFAULT_FUSED_BLOCKS`]): every load of a tile is issued before its
/// arithmetic, so ptxas gives the D=128 kernels 160-240 registers per thread and two
/// 128-thread blocks fit an SM at once; 264 blocks are one full wave. Whole-model decode
/// measured 264 faster than 528 (two waves) at 32K and 128K (docs/gpu-whole-model-h200.md):
/// fewer splits also make the merge cheaper. Splits are never shorter than one tile per warp.
#[cfg(test)]
const TARGET_BLOCKS: usize = mlx_ext::options::DEFAULT_FUSED_BLOCKS;

const COMMON: &str = include_str!("kernels/decode_common.cuh");
// The fold (the merge inside the step launch) is shared by both attention passes.
const PARTIAL: &str = concat!(include_str!("kernels/decode_partial.cu"), include_str!("kernels/decode_fold.cu"));
const MERGE: &str = include_str!("kernels/decode_merge.cu");
const CHANNELS: &str = concat!(include_str!("kernels/decode_channels.cu"), include_str!("kernels/decode_fold.cu"));
/// The tensor-core variant of the attention pass.
const MMA: &str = "#define KV_MMA 1\n";

/// Whether the fused kernel covers these widths and shapes (the dispatcher in [`super`] checks
/// the backend and the options). head_dim must be a power of two so that the lanes sharing a
/// value dim slice are a power-of-two stride apart (they are summed with xor shuffles). Every
/// width reads and writes MLX's packing; 5 bits (5-byte packs) is not covered.
pub fn covers(k_bits: u8, v_bits: u8, head_dim: usize, rows: usize) -> bool {
    let read = |b: u8| matches!(b, 2 | 3 | 4 | 6 | 8);
    read(k_bits)
        && read(v_bits)
        && matches!(head_dim, 32 | 64 | 128 | 256)
        && (1..=8).contains(&rows)
}

/// Whether [`attend_channels`] covers per-channel keys of these widths and shapes: what
/// [`covers`] takes, with key groups (along tokens) of whole 32-token tiles, so that a tile's
/// tokens share one scale per channel.
pub fn covers_channels(k_bits: u8, k_group: usize, v_bits: u8, head_dim: usize, rows: usize) -> bool {
    covers(k_bits, v_bits, head_dim, rows) && k_group > 0 && k_group.is_multiple_of(32)
}

/// The most sink tokens (`--kv-sinks`) the per-channel kernel reads beside its body: one tile
/// of 32 lanes (`decode_channels.cu` asserts the same).
pub const MAX_SINKS: usize = 32;

/// Whether the tensor-core variant of the attention pass (`KV_MMA` in decode_partial.cu) covers
/// this case: key and value groups of 64, head_dim 64 or 128, 4- or 8-bit keys, 2-, 4- or 8-bit
/// values, at most 8 query rows per KV head, and f16 or bf16 queries (its query fragments are
/// f16: an f32 query would be rounded). Elsewhere the CUDA-core variant runs: for 3- and 6-bit
/// keys or values always. The tensor-core variant turns two codes into an f16 pair with one
/// byte permute or mask, which needs codes at fixed positions in a byte or nibble; a 6-bit code
/// pair sits at different shifts in a 3-byte pack (two shifts and masks per pair), and a lane's
/// 8-dim value chunk is 6 bytes at 2-byte alignment, so 3/6 bits would need their own fragment
/// loaders: not written.
pub fn mma_applies(k: &PackedOperand, v: &PackedOperand, head_dim: usize, rows: usize, q_dtype: Dtype) -> bool {
    mlx_ext::options::current().gpu_fused_mma.on() && mma_covers(k.bits, k.group, v.bits, v.group, head_dim, rows, q_dtype)
}

/// The shapes [`mma_applies`] accepts, whatever `--gpu-fused-mma` says (fused_check's error bounds).
pub fn mma_covers(k_bits: u8, k_group: usize, v_bits: u8, v_group: usize, head_dim: usize, rows: usize, q_dtype: Dtype) -> bool {
    k_group == 64
        && v_group == 64
        && matches!(head_dim, 64 | 128)
        && matches!(k_bits, 4 | 8)
        && matches!(v_bits, 2 | 4 | 8)
        && (1..=8).contains(&rows)
        && matches!(q_dtype, Dtype::Float16 | Dtype::Bfloat16)
}

/// Dims each lane owns in the value pass: a power of two with at most 64 bits of codes per
/// lane and token (one 2-, 4- or 8-byte load; 3 or 6 bytes at 3/6 bits, one or two aligned
/// words) and at most 32 accumulators per lane (`rows * dims`, so the kernel stays near 130
/// registers), but enough that 32 lanes cover head_dim, at least 2 bytes of codes (the smallest
/// load the kernel issues) in whole bytes (3/6 bits: 4 or 8 dims at least), and inside one
/// value group (one scale and bias per lane and token).
pub fn value_dims(head_dim: usize, v_bits: u8, rows: usize, v_group: usize) -> usize {
    let bits = v_bits as usize;
    let cap = (64 / bits).min(32 / rows.max(1)).max(1);
    let mut vd = 1;
    while vd * 2 <= cap {
        vd *= 2;
    }
    let mut least = 1;
    while least * bits < 16 || !(least * bits).is_multiple_of(8) {
        least *= 2;
    }
    vd.max(head_dim / 32).max(least).min(v_group).min(head_dim)
}

/// Token splits for `t` tokens over `heads` blocks rows: `(n_split, per)` with `per` a multiple
/// of 32 (whole tiles), every split non-empty, and `n_split * per >= t`.
pub fn split_plan(t: usize, heads: usize) -> (usize, usize) {
    let tile = 32 * WARPS as usize;
    let target = mlx_ext::options::current().gpu_fused_blocks;
    let want = target.div_ceil(heads.max(1)).clamp(1, t.div_ceil(tile).max(1));
    let per = t.div_ceil(want).div_ceil(32) * 32;
    (t.div_ceil(per).max(1), per.max(32))
}

const PARTIAL_DEF: KernelDef = KernelDef {
    stem: "kvsplit_attn_partial",
    header: COMMON,
    defines: "#define KV_STEP 0\n",
    body: PARTIAL,
    inputs: &["q", "kw", "ks", "kb", "vw", "vs", "vb", "meta"],
    outputs: &["out_o", "out_m", "out_l"],
};
const MERGE_DEF: KernelDef = KernelDef {
    stem: "kvsplit_attn_merge",
    header: COMMON,
    defines: "#define KV_STEP 0\n",
    body: MERGE,
    inputs: &["part_o", "part_m", "part_l", "meta"],
    outputs: &["out"],
};
const CHANNELS_DEF: KernelDef = KernelDef {
    stem: "kvsplit_channels_partial",
    header: COMMON,
    defines: "",
    body: CHANNELS,
    inputs: &["q", "kw", "ks", "kb", "vw", "vs", "vb", "tk", "tv", "sk", "sv", "meta"],
    outputs: &["out_o", "out_m", "out_l"],
};
/// The per-channel step's inputs: `sk`, `sv` are the sink tokens (`NS` rows; the tail again,
/// never read, when there are none).
const CHANNEL_STEP_INPUTS: &[&str] = &["q", "knew", "vnew", "kw", "ks", "kb", "vw", "vs", "vb", "tk", "tv", "sk", "sv", "pos"];
const CHANNELS_STEP_DEF: KernelDef = KernelDef {
    stem: "kvsplit_channels_step",
    header: COMMON,
    defines: "#define KV_CSTEP 1\n",
    body: CHANNELS,
    inputs: CHANNEL_STEP_INPUTS,
    outputs: &["out_o", "out_m", "out_l"],
};
const CHANNELS_FOLD_DEF: KernelDef = KernelDef {
    stem: "kvsplit_channels_fold",
    header: COMMON,
    defines: "#define KV_CSTEP 1\n#define KV_FOLD 1\n",
    body: CHANNELS,
    inputs: CHANNEL_STEP_INPUTS,
    outputs: &["part", "out"],
};
/// The decode step's inputs (the query, the new token's K and V, the cache buffers, `pos`).
const STEP_INPUTS: &[&str] = &["q", "knew", "vnew", "kw", "ks", "kb", "vw", "vs", "vb", "pos"];
const STEP_PARTIAL_DEF: KernelDef = KernelDef {
    stem: "kvsplit_step_partial",
    header: COMMON,
    defines: "#define KV_STEP 1\n",
    body: PARTIAL,
    inputs: STEP_INPUTS,
    outputs: &["out_o", "out_m", "out_l"],
};
const STEP_FOLD_DEF: KernelDef = KernelDef {
    stem: "kvsplit_step_fold",
    header: COMMON,
    defines: "#define KV_STEP 1\n#define KV_FOLD 1\n",
    body: PARTIAL,
    inputs: STEP_INPUTS,
    outputs: &["part", "out"],
};
const STEP_ROT_FOLD_DEF: KernelDef = KernelDef {
    stem: "kvsplit_step_rot_fold",
    header: COMMON,
    defines: "#define KV_STEP 1\n#define KV_FOLD 1\n#define KV_ROT 1\n",
    body: PARTIAL,
    inputs: STEP_INPUTS,
    outputs: &["part", "out"],
};
const STEP_ROT_CENTER_FOLD_DEF: KernelDef = KernelDef {
    stem: "kvsplit_step_rotc_fold",
    header: COMMON,
    defines: "#define KV_STEP 1\n#define KV_FOLD 1\n#define KV_ROT 1\n#define KV_CENTER 1\n",
    body: PARTIAL,
    inputs: &["q", "knew", "vnew", "kw", "ks", "kb", "vw", "vs", "vb", "pos", "kc"],
    outputs: &["part", "out"],
};
const PAGED_PARTIAL_DEF: KernelDef = KernelDef {
    stem: "kvsplit_paged_partial",
    header: COMMON,
    defines: "#define KV_STEP 1\n#define KV_PAGED 1\n",
    body: PARTIAL,
    inputs: &["q", "knew", "vnew", "kw", "ks", "kb", "vw", "vs", "vb", "table", "ctr"],
    outputs: &["out_o", "out_m", "out_l"],
};
const PAGED_FOLD_DEF: KernelDef = KernelDef {
    stem: "kvsplit_paged_fold",
    header: COMMON,
    defines: "#define KV_STEP 1\n#define KV_FOLD 1\n#define KV_PAGED 1\n",
    body: PARTIAL,
    inputs: &["q", "knew", "vnew", "kw", "ks", "kb", "vw", "vs", "vb", "table", "ctr"],
    outputs: &["part", "out"],
};
const PAGED_MERGE_DEF: KernelDef = KernelDef {
    stem: "kvsplit_paged_merge",
    header: COMMON,
    defines: "#define KV_STEP 1\n#define KV_PAGED 1\n",
    body: MERGE,
    inputs: &["part_o", "part_m", "part_l"],
    outputs: &["out"],
};
const STEP_MERGE_DEF: KernelDef = KernelDef {
    stem: "kvsplit_step_merge",
    header: COMMON,
    defines: "#define KV_STEP 1\n",
    body: MERGE,
    inputs: &["part_o", "part_m", "part_l", "pos"],
    outputs: &["out"],
};

/// The query scale as a template argument (its f32 bits): one value per model, so one
/// compiled variant, and no multiply op per layer.
fn scale_bits(scale: f32) -> i32 {
    scale.to_bits() as i32
}

/// The template arguments every attention kernel variant is compiled for; `k` and `v` are
/// (bits, group).
fn shape_args(d: i32, k: (u8, usize), v: (u8, usize), rows: i32, vd: usize, scale: f32) -> [(&'static str, i32); 9] {
    [
        ("D", d),
        ("BK", k.0 as i32),
        ("BV", v.0 as i32),
        ("GK", k.1 as i32),
        ("GV", v.1 as i32),
        ("REP", rows),
        ("WARPS", WARPS),
        ("VD", vd as i32),
        ("SCALE_BITS", scale_bits(scale)),
    ]
}
/// Decode attention of `q` (`[B, Hq, L, D]`, unscaled) over the first `len` tokens of the packed
/// buffers (capacity `cap`): [`decode_attention`] on the GQA-folded, scaled query. Returns
/// `[B, Hq, L, D]` in `q`'s dtype.
pub fn attend(q: &Array, k: PackedOperand, v: PackedOperand, len: usize, cap: usize, scale: f32) -> Result<Array> {
    let qs = q.shape();
    let (b, hq, l, d) = (qs[0], qs[1], qs[2], qs[3]);
    let hkv = k.full.w.shape()[1];
    let rep = hq / hkv;
    let q3 = (q * Array::from_f32(scale).as_dtype(q.dtype())?).reshape(&[b * hkv, rep * l, d])?;
    let out3 = decode_attention(&q3, k, v, len, cap)?;
    Ok(out3.as_dtype(q.dtype())?.reshape(&[b, hkv, rep, l, d])?.reshape(&[b, hq, l, d])?)
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
        if mma { MMA } else { "" },
        &[q3, &k.full.w, &k.full.scales, &k.full.biases, &v.full.w, &v.full.scales, &v.full.biases, &meta],
        &[
            Out { shape: &[bh, ns, rows, d], dtype: Dtype::Float32 },
            Out { shape: &[bh, ns, rows], dtype: Dtype::Float32 },
            Out { shape: &[bh, ns, rows], dtype: Dtype::Float32 },
        ],
        (ns * 32 * WARPS, bh),
        32 * WARPS,
        &shape_args(d, (k.bits, k.group), (v.bits, v.group), rows, vd, 1.0),
        // Unused by this kernel; it keeps f16 and bf16 queries apart in MLX's kernel names (see
        // `decode_step_paged`).
        &[("OT", q3.dtype())],
    )?;
    let out = run_kernel(
        &MERGE_DEF,
        "",
        &[&parts[0], &parts[1], &parts[2], &meta],
        &[Out { shape: &[bh, rows, d], dtype: q3.dtype() }],
        (d, bh * rows),
        d,
        &[("D", d), ("REP", rows)],
        &[("OT", q3.dtype())],
    )?;
    Ok(out.into_iter().next().expect("the merge kernel has one output"))
}

/// The per-channel kernel's sink inputs: the sink tokens' K and V (`[B, Hkv, NS, D]`, at most
/// one tile of 32) and NS, or the tail's arrays and 0 where there are none (never read).
fn sink_rows<'a>(sinks: Option<(&'a Array, &'a Array)>, tk: &'a Array, tv: &'a Array, bh: i32, d: i32) -> Result<(&'a Array, &'a Array, i32)> {
    let Some((sk, sv)) = sinks else { return Ok((tk, tv, 0)) };
    let s = sk.shape();
    if sv.shape() != s || s.len() != 4 || s[0] * s[1] != bh || s[3] != d || !(1..=MAX_SINKS as i32).contains(&s[2]) {
        return Err(KvError::Shape(format!("fused per-channel attention: sink tokens {s:?}/{:?} for {bh} heads of {d} (1 to {MAX_SINKS} sinks)", sv.shape())));
    }
    Ok((sk, sv, s[2]))
}

/// Decode attention of `q` (`[B, Hq, L, D]`, unscaled) over a per-channel key body, its float
/// sink tokens and its float tail (`b`, see [`ChannelBody`]): the sinks, the body's `b.len`
/// tokens (whole key groups) and then the tail's, in one softmax, in two launches (`kernels/decode_channels.cu`, then the merge).
/// Returns `[B, Hq, L, D]` in `q`'s dtype.
pub(crate) fn attend_channels(q: &Array, b: &ChannelBody, scale: f32) -> Result<Array> {
    let qs = q.shape();
    let (bs, hq, l, d) = (qs[0], qs[1], qs[2], qs[3]);
    let hkv = b.k.full.w.shape()[1];
    let (bh, rows) = (bs * hkv, hq / hkv * l);
    // Unscaled: the kernel scales the query (one op less per layer; ops cost on the GPU).
    let q3 = q.reshape(&[bs, hkv, hq / hkv, l, d])?.reshape(&[bh, rows, d])?;
    // An empty tail still needs an input: one zero row, never read (T = len).
    let empty;
    let (tk, tv, n) = match b.tail {
        Some((tk, tv)) => (tk, tv, tk.shape()[2] as usize),
        None => {
            empty = mlx_rs::ops::zeros_dtype(&[bs, hkv, 1, d], Dtype::Float16)?;
            (&empty, &empty, 0)
        }
    };
    let (sk, sv, n_sinks) = sink_rows(b.sink, tk, tv, bs * hkv, d)?;
    let t = b.len + n;
    if t == 0 || b.len > b.cap || !b.len.is_multiple_of(b.k.group) {
        return Err(KvError::Shape(format!("fused per-channel attention: {} body tokens (capacity {}, key groups of {})", b.len, b.cap, b.k.group)));
    }
    let (n_split, per) = split_plan(t, bh as usize);
    let vd = value_dims(d as usize, b.v.bits, rows as usize, b.v.group);
    let meta = Array::from_slice(&[t as i32, 0, per as i32, n_split as i32, b.len as i32], &[5]);
    let ns = n_split as i32;
    let (k, v) = (b.k.full, b.v.full);
    let parts = run_kernel(
        &CHANNELS_DEF,
        "",
        &[&q3, &k.w, &k.scales, &k.biases, &v.w, &v.scales, &v.biases, tk, tv, sk, sv, &meta],
        &[
            Out { shape: &[bh, ns, rows, d], dtype: Dtype::Float32 },
            Out { shape: &[bh, ns, rows], dtype: Dtype::Float32 },
            Out { shape: &[bh, ns, rows], dtype: Dtype::Float32 },
        ],
        (ns * 32 * WARPS, bh),
        32 * WARPS,
        &[&shape_args(d, (b.k.bits, b.k.group), (b.v.bits, b.v.group), rows, vd, scale)[..], &[("NS", n_sinks)]].concat(),
        // Every dtype in the kernel's name (see `decode_step_paged`): the tail is f16, bf16 or
        // f32 (a narrowed f16 tail reads back as f32), and the sinks keep theirs.
        &[("OT", q.dtype()), ("TT", tk.dtype()), ("ST", sk.dtype())],
    )?;
    let out = run_kernel(
        &MERGE_DEF,
        "",
        &[&parts[0], &parts[1], &parts[2], &meta],
        &[Out { shape: &[bh, rows, d], dtype: q.dtype() }],
        (d, bh * rows),
        d,
        &[("D", d), ("REP", rows)],
        &[("OT", q.dtype())],
    )?;
    let out = out.into_iter().next().expect("the merge kernel has one output");
    Ok(out.reshape(&[bs, hkv, hq / hkv, l, d])?.reshape(&[bs, hq, l, d])?)
}

/// One decode step of a layer with per-channel keys, in one launch (two with
/// `--gpu-fused-fold off`) and no other op: the new token's key and value (`k_new`, `v_new`:
/// `[B, Hkv, 1, D]`) are written in place into row `pos[0]` of the cache's float tail buffers
/// (`tk`, `tv`: the whole `[B, Hkv, NT, D]` buffers, row-contiguous, rows past the tail's
/// tokens unused), rounded to the tail's dtype as `astype` rounds, then `q` (`[B, Hq, 1, D]`,
/// unscaled) attends over the body's `pos[1022]` tokens (whole key groups, `b.len`, which only
/// sizes the splits here) and the tail's `pos[0] + 1` as [`attend_channels`] does, after the
/// `sinks` (K and V `[B, Hkv, NS, D]` in the stored frame, NS <= 32), if any.
///
/// `pos` is an int32 device array of 1024 elements: `pos[0]` the new token's tail row,
/// `pos[1022]` the body's tokens, the rest 0 (the fold's arrival counters); the step adds one
/// to `pos[0]`, so consecutive steps into one tail reuse it. `t` is the tokens after the step
/// (body and tail): it sizes the splits only. Sound for the reasons [`decode_step`] gives: the
/// cache owns the tail buffers and later readers depend on this step's output.
/// Returns `[B, Hq, 1, D]` in `q`'s dtype.
///
/// `rot` (only where [`channel_fold_applies`]; 0 otherwise): Hadamard rotations done in the
/// kernel instead of as matmul ops around it: bit 0 keys (`q` and `k_new` come unrotated and
/// enter the stored frame in f32 inside), bit 1 values (`v_new` unrotated, the output rotated
/// back before it is written).
#[allow(clippy::too_many_arguments)]
pub(crate) fn step_channels(
    q: &Array,
    k_new: &Array,
    v_new: &Array,
    k: PackedOperand,
    v: PackedOperand,
    (tk, tv): (&Array, &Array),
    sinks: Option<(&Array, &Array)>,
    pos: &Array,
    t: usize,
    scale: f32,
    rot: u8,
) -> Result<Array> {
    let s = q.shape();
    let (b, hq, l, d) = (s[0], s[1], s[2], s[3]);
    let hkv = k_new.shape()[1];
    if l != 1 || hq % hkv != 0 || tk.shape() != tv.shape() || tk.shape()[1] != hkv || tk.shape()[3] != d || tk.dtype() != tv.dtype() {
        return Err(KvError::Shape(format!("fused per-channel step: q {s:?}, tail {:?}/{:?} with {hkv} KV heads", tk.shape(), tv.shape())));
    }
    if t == 0 {
        return Err(KvError::Capacity { requested: t, capacity: 0 });
    }
    let (bh, rows) = (b * hkv, hq / hkv);
    let (n_split, _) = split_plan(t, bh as usize);
    let vd = value_dims(d as usize, v.bits, rows as usize, v.group);
    let ns = n_split as i32;
    let fold = channel_fold_applies(t, bh as usize, d as usize);
    if rot != 0 && !fold {
        return Err(KvError::Shape("fused per-channel step: in-kernel rotation needs the folded launch".into()));
    }
    let (sk, sv, n_sinks) = sink_rows(sinks, tk, tv, bh, d)?;
    let mut ints = shape_args(d, (k.bits, k.group), (v.bits, v.group), rows, vd, scale).to_vec();
    ints.push(("ROT", rot as i32));
    ints.push(("NS", n_sinks));
    let inputs = [q, k_new, v_new, &k.full.w, &k.full.scales, &k.full.biases, &v.full.w, &v.full.scales, &v.full.biases, tk, tv, sk, sv, pos];
    // Every dtype in the name (see `decode_step_paged`); the tail's picks TT.
    let types = [("OT", q.dtype()), ("TT", tk.dtype()), ("KT", k_new.dtype()), ("ST", sk.dtype())];
    if fold {
        let out = run_kernel(
            &CHANNELS_FOLD_DEF,
            "",
            &inputs,
            &[Out { shape: &[bh * ns * rows * (d + 2)], dtype: Dtype::Float32 }, Out { shape: &[b, hq, 1, d], dtype: q.dtype() }],
            (ns * 32 * WARPS, bh),
            32 * WARPS,
            &ints,
            &types,
        )?;
        return Ok(out.into_iter().nth(1).expect("the fold kernel has two outputs"));
    }
    let parts_out = [
        Out { shape: &[bh, ns, rows, d], dtype: Dtype::Float32 },
        Out { shape: &[bh, ns, rows], dtype: Dtype::Float32 },
        Out { shape: &[bh, ns, rows], dtype: Dtype::Float32 },
    ];
    let parts = run_kernel(&CHANNELS_STEP_DEF, "", &inputs, &parts_out, (ns * 32 * WARPS, bh), 32 * WARPS, &ints, &types)?;
    let out = run_kernel(
        &STEP_MERGE_DEF,
        "",
        &[&parts[0], &parts[1], &parts[2], pos],
        &[Out { shape: &[b, hq, 1, d], dtype: q.dtype() }],
        (d, bh * rows),
        d,
        &[("D", d), ("REP", rows)],
        &[("OT", q.dtype())],
    )?;
    Ok(out.into_iter().next().expect("the merge kernel has one output"))
}

/// Whether [`step_channels`] of `t` tokens over `bh` heads runs as one launch (the fold), where
/// it can also rotate: `--gpu-fused-fold on`, split weights fitting the kernel's staging, and
/// pos[1022] (the body length) clear of the heads' arrival counters.
pub(crate) fn channel_fold_applies(t: usize, bh: usize, d: usize) -> bool {
    let (n_split, _) = split_plan(t, bh);
    mlx_ext::options::current().gpu_fused_fold.on() && n_split <= WARPS as usize * d && bh < 1021
}

/// The stored frame of a cache whose [`decode_step`] enters it inside the kernel, where MLX
/// ops around the launch would otherwise do it (three matmuls and a subtract per layer and
/// token, each an op MLX dispatches): `rot` bit 0 keys rotated, bit 1 values rotated (the
/// Sylvester Hadamard matrix over sqrt(head_dim), as [`crate::rotation::hadamard`]), and
/// `center` the cache's key center (`[B, Hkv, 1, D]`, in the keys' frame), taken off each new
/// key.
#[derive(Clone, Copy)]
pub struct StoredFrame<'a> {
    pub rot: u8,
    pub center: Option<&'a Array>,
}

/// Whether [`decode_step`] of `t` tokens over `bh` heads runs as one launch (the fold), which it
/// needs to enter a [`StoredFrame`]: `--gpu-fused-fold on`, split weights fitting the kernel's
/// staging, and the heads' arrival counters inside `pos`.
pub fn step_fold_applies(t: usize, bh: usize, d: usize) -> bool {
    let (n_split, _) = split_plan(t, bh);
    mlx_ext::options::current().gpu_fused_fold.on() && n_split <= WARPS as usize * d && bh < 1022
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
///
/// With a `frame` (only where [`step_fold_applies`]), `q`, `k_new` and `v_new` come in the
/// model's frame and the kernel moves them into the cache's, and the output back out of the
/// values' frame, in f32 ([`StoredFrame`]).
#[allow(clippy::too_many_arguments)]
pub fn decode_step(q: &Array, k_new: &Array, v_new: &Array, k: PackedOperand, v: PackedOperand, pos: &Array, t: usize, cap: usize, scale: f32, frame: Option<StoredFrame>) -> Result<Array> {
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
    let ints = shape_args(d, (k.bits, k.group), (v.bits, v.group), rows, vd, scale);
    let mma = mma_applies(&k, &v, d as usize, rows as usize, q.dtype());
    let inputs = [q, k_new, v_new, &k.full.w, &k.full.scales, &k.full.biases, &v.full.w, &v.full.scales, &v.full.biases, pos];
    let fold = step_fold_applies(t, bh as usize, d as usize);
    if let Some(frame) = frame {
        if !fold {
            return Err(KvError::Shape("fused decode step: entering the cache's frame needs the folded launch".into()));
        }
        if let Some(c) = frame.center {
            if c.shape() != [b, hkv, 1, d] {
                return Err(KvError::Shape(format!("fused decode step: key center {:?}, want [{b}, {hkv}, 1, {d}]", c.shape())));
            }
        }
        let mut ints = ints.to_vec();
        ints.push(("ROT", frame.rot as i32));
        let mut inputs = inputs.to_vec();
        let def = match frame.center {
            Some(c) => {
                inputs.push(c);
                &STEP_ROT_CENTER_FOLD_DEF
            }
            None => &STEP_ROT_FOLD_DEF,
        };
        let out = run_kernel(
            def,
            if mma { MMA } else { "" },
            &inputs,
            &[Out { shape: &[bh * ns * rows * (d + 2)], dtype: Dtype::Float32 }, Out { shape: &[b, hq, 1, d], dtype: q.dtype() }],
            (ns * 32 * WARPS, bh),
            32 * WARPS,
            &ints,
            &[("OT", q.dtype())],
        )?;
        return Ok(out.into_iter().nth(1).expect("the fold kernel has two outputs"));
    }
    let parts_out = [
        Out { shape: &[bh, ns, rows, d], dtype: Dtype::Float32 },
        Out { shape: &[bh, ns, rows], dtype: Dtype::Float32 },
        Out { shape: &[bh, ns, rows], dtype: Dtype::Float32 },
    ];
    // One launch: the last block of each head merges its splits (split weights are staged in
    // the kernel's WARPS * D shared floats; arrival counters live in pos[1..1023]).
    if fold {
        let out = run_kernel(
            &STEP_FOLD_DEF,
            if mma { MMA } else { "" },
            &inputs,
            &[Out { shape: &[bh * ns * rows * (d + 2)], dtype: Dtype::Float32 }, Out { shape: &[b, hq, 1, d], dtype: q.dtype() }],
            (ns * 32 * WARPS, bh),
            32 * WARPS,
            &ints,
            &[("OT", q.dtype())],
        )?;
        return Ok(out.into_iter().nth(1).expect("the fold kernel has two outputs"));
    }
    let parts = run_kernel(&STEP_PARTIAL_DEF, if mma { MMA } else { "" }, &inputs, &parts_out, (ns * 32 * WARPS, bh), 32 * WARPS, &ints, &[("OT", q.dtype())])?;
    let out = run_kernel(
        &STEP_MERGE_DEF,
        "",
        &[&parts[0], &parts[1], &parts[2], pos],
        &[Out { shape: &[b, hq, 1, d], dtype: q.dtype() }],
        (d, bh * rows),
        d,
        &[("D", d), ("REP", rows)],
        &[("OT", q.dtype())],
    )?;
    Ok(out.into_iter().next().expect("the merge kernel has one output"))
}

/// One layer's arrays of a block pool (vLLM-style paged KV): `w` u32
/// `[NB, Hkv, BLOCK, D * bits / 32]`, `scales` and `biases` f16 `[NB, Hkv, BLOCK, D / group]`,
/// each row laid out as a cache buffer's (MLX affine quantization along head_dim). They must be
/// row-contiguous: [`decode_step_paged`] writes into them in place, and MLX hands a
/// non-contiguous input to a kernel as a copy, where the write would be lost.
/// The same operand the CPU primitives take.
pub type PagedPool<'a> = mlx_ext::cpu::PackedRef<'a>;

/// Sequences, KV heads, query rows per KV head, head_dim and tokens per pool block of a paged
/// step.
#[derive(Debug, PartialEq)]
struct PagedDims {
    s: i32,
    hkv: i32,
    rows: i32,
    d: i32,
    block: i32,
}

/// Checks the shapes and dtypes of a paged step's arguments (see [`decode_step_paged`]): the
/// kernel indexes raw buffers, so a mismatch would read or write the wrong rows.
#[allow(clippy::too_many_arguments)]
fn paged_dims(q: &Array, k_new: &Array, v_new: &Array, k: &PagedPool, v: &PagedPool, table: &Array, ctr: &Array, max_t: usize) -> Result<PagedDims> {
    let bad = |what: String| Err(KvError::Shape(format!("fused paged decode step: {what}")));
    let (qs, ks) = (q.shape(), k_new.shape());
    let [s, hq, 1, d] = *qs else { return bad(format!("q is {qs:?}, want [S, Hq, 1, D]")) };
    let [s2, hkv, 1, d2] = *ks else { return bad(format!("k_new is {ks:?}, want [S, Hkv, 1, D]")) };
    if (s2, d2) != (s, d) || v_new.shape() != ks || hkv == 0 || hq % hkv != 0 {
        return bad(format!("q {qs:?}, k_new {ks:?} and v_new {:?} do not agree", v_new.shape()));
    }
    if v_new.dtype() != k_new.dtype() {
        return bad(format!("k_new is {:?} but v_new {:?}", k_new.dtype(), v_new.dtype()));
    }
    let rows = hq / hkv;
    if !covers(k.bits, v.bits, d as usize, rows as usize) {
        return bad(format!("k{} v{} with head_dim {d} and {rows} query rows per KV head is not covered", k.bits, v.bits));
    }
    let lanes = (d as usize / 32).max(1);
    let block = k.w.shape().get(2).copied().unwrap_or(0);
    let nb = k.w.shape().first().copied().unwrap_or(0);
    for (name, p) in [("key", k), ("value", v)] {
        if p.group == 0 || !(d as usize).is_multiple_of(p.group) || !p.group.is_multiple_of(lanes) {
            return bad(format!("{name} group {} does not divide head_dim {d} in whole lanes", p.group));
        }
        let want_w = [nb, hkv, block, d * p.bits as i32 / 32];
        let want_s = [nb, hkv, block, d / p.group as i32];
        if p.w.shape() != want_w || p.scales.shape() != want_s || p.biases.shape() != want_s {
            return bad(format!(
                "{name} pool is w {:?}, scales {:?}, biases {:?}; want {want_w:?} and {want_s:?}",
                p.w.shape(),
                p.scales.shape(),
                p.biases.shape()
            ));
        }
        if p.w.dtype() != Dtype::Uint32 || p.scales.dtype() != Dtype::Float16 || p.biases.dtype() != Dtype::Float16 {
            return bad(format!("{name} pool dtypes {:?}/{:?}/{:?}, want u32/f16/f16", p.w.dtype(), p.scales.dtype(), p.biases.dtype()));
        }
    }
    // Whole 32-token tiles per block: the kernel reads one table entry per tile.
    if block <= 0 || block % 32 != 0 {
        return bad(format!("pool blocks of {block} tokens, want a multiple of 32"));
    }
    let ts = table.shape();
    let [s3, width] = *ts else { return bad(format!("table is {ts:?}, want [S, 1 + max blocks]")) };
    if s3 != s || width < 2 || table.dtype() != Dtype::Int32 {
        return bad(format!("table is {ts:?} {:?}, want [{s}, 1 + max blocks] int32", table.dtype()));
    }
    let capacity = (width as usize - 1) * block as usize;
    if max_t == 0 || max_t > capacity {
        return Err(KvError::Capacity { requested: max_t, capacity });
    }
    if ctr.shape() != [1024] || ctr.dtype() != Dtype::Int32 {
        return bad(format!("ctr is {:?} {:?}, want [1024] int32", ctr.shape(), ctr.dtype()));
    }
    Ok(PagedDims { s, hkv, rows, d, block })
}

/// One decode step of a layer for S sequences whose caches live in a block pool, in one launch
/// (two without the fold) and no other op. `q` is `[S, Hq, 1, D]` (unscaled), `k_new` and
/// `v_new` `[S, Hkv, 1, D]`; returns `[S, Hq, 1, D]` in `q`'s dtype.
///
/// `table` is int32 `[S, 1 + MAXB]`, row-contiguous: `table[s][0]` is T_s, the tokens sequence s
/// holds after this step (its new token is token T_s - 1; a row with T_s = 0 writes nothing and
/// gets an undefined output), and `table[s][1 + j]` the pool block of its tokens
/// `[j * BLOCK, (j + 1) * BLOCK)`; entries past its blocks are never read. The
/// kernel quantizes each new token as MLX's `quantize` does and writes it into its slot of the
/// pool, then attends over the T_s tokens. `max_t` (the longest T_s) only sizes the token
/// splits: each sequence splits its own T_s over them, so a wrong value costs speed, not
/// correctness. `ctr` is an int32 `[1024]` array of zeros in a device buffer of its own (an add
/// of a host array, as `KvCache` makes its position counter; MLX's `zeros` is a broadcast, which
/// a kernel gets as a copy), reused from launch to launch: the fold's arrival counters, left
/// zero again by every launch.
///
/// Writing into arrays MLX treats as inputs is sound because the pool owns them and nothing else
/// reads them in the same graph; each sequence's new slot lies in a block only its own table row
/// names (a pool shares only full blocks), and MLX runs later readers of the pool (the next
/// layer's and next step's launches, which depend on this output) after this launch.
#[allow(clippy::too_many_arguments)]
pub fn decode_step_paged(
    q: &Array,
    k_new: &Array,
    v_new: &Array,
    k: PagedPool<'_>,
    v: PagedPool<'_>,
    table: &Array,
    ctr: &Array,
    max_t: usize,
    scale: f32,
) -> Result<Array> {
    let PagedDims { s, hkv, rows, d, block } = paged_dims(q, k_new, v_new, &k, &v, table, ctr, max_t)?;
    let opts = mlx_ext::options::current();
    let bh = s * hkv;
    let (n_split, _) = split_plan(max_t, bh as usize);
    let ns = n_split as i32;
    let vd = value_dims(d as usize, v.bits, rows as usize, v.group);
    let mut ints = shape_args(d, (k.bits, k.group), (v.bits, v.group), rows, vd, scale).to_vec();
    ints.push(("BLOCK", block));
    let mma = opts.gpu_fused_mma.on() && mma_covers(k.bits, k.group, v.bits, v.group, d as usize, rows as usize, q.dtype());
    let inputs = [q, k_new, v_new, k.w, k.scales, k.biases, v.w, v.scales, v.biases, table, ctr];
    // MLX names a compiled custom kernel by its name and template arguments only, not by its
    // inputs' dtypes: both dtypes go in as (otherwise unused) type arguments, or an f16 and a
    // bf16 model would share one compiled variant (in the process and in MLX's disk cache).
    let types = [("OT", q.dtype()), ("NT", k_new.dtype())];
    let out = Out { shape: &[s, hkv * rows, 1, d], dtype: q.dtype() };
    let grid = (ns * 32 * WARPS, bh);
    // As in `decode_step`: split weights staged in WARPS * D shared floats, a counter per head.
    if opts.gpu_fused_fold.on() && n_split <= (WARPS * d) as usize && bh < 1022 {
        let scratch = Out { shape: &[bh * ns * rows * (d + 2)], dtype: Dtype::Float32 };
        let got = run_kernel(&PAGED_FOLD_DEF, if mma { MMA } else { "" }, &inputs, &[scratch, out], grid, 32 * WARPS, &ints, &types)?;
        return Ok(got.into_iter().nth(1).expect("the fold kernel has two outputs"));
    }
    let parts_out = [
        Out { shape: &[bh, ns, rows, d], dtype: Dtype::Float32 },
        Out { shape: &[bh, ns, rows], dtype: Dtype::Float32 },
        Out { shape: &[bh, ns, rows], dtype: Dtype::Float32 },
    ];
    let parts = run_kernel(&PAGED_PARTIAL_DEF, if mma { MMA } else { "" }, &inputs, &parts_out, grid, 32 * WARPS, &ints, &types)?;
    let got = run_kernel(&PAGED_MERGE_DEF, "", &[&parts[0], &parts[1], &parts[2]], &[out], (d, bh * rows), d, &[("D", d), ("REP", rows)], &[("OT", q.dtype())])?;
    Ok(got.into_iter().next().expect("the merge kernel has one output"))
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
        let (header, body) = mlx_ext::cuda_kernel::include_files(&STEP_PARTIAL_DEF, &source, 1).expect("temp dir is writable");
        assert!(header.starts_with("#include \"") && header.len() < 200, "{header}");
        assert!(body.contains("kw_shape") && body.len() < 300, "{body}");
        let path = body.split('"').nth(1).unwrap();
        assert_eq!(std::fs::read_to_string(path).unwrap(), source);
        let (_, merge) = mlx_ext::cuda_kernel::include_files(&STEP_MERGE_DEF, &[STEP_MERGE_DEF.defines, STEP_MERGE_DEF.body].concat(), 1).unwrap();
        assert!(merge.contains("part_m_shape"), "{merge}");
    }

    #[test]
    fn paged_kernel_sources_name_their_shape_parameters() {
        for def in [&PAGED_PARTIAL_DEF, &PAGED_FOLD_DEF] {
            let (_, body) = mlx_ext::cuda_kernel::include_files(def, &[def.defines, def.body].concat(), 2).expect("temp dir is writable");
            assert!(body.contains("kw_shape") && body.contains("table_shape"), "{body}");
        }
        let (_, merge) = mlx_ext::cuda_kernel::include_files(&PAGED_MERGE_DEF, &[PAGED_MERGE_DEF.defines, PAGED_MERGE_DEF.body].concat(), 2).unwrap();
        assert!(merge.contains("part_m_shape"), "{merge}");
    }

    #[test]
    fn channel_step_sources_name_their_shape_parameters_and_carry_the_fold() {
        for def in [&CHANNELS_STEP_DEF, &CHANNELS_FOLD_DEF, &CHANNELS_DEF] {
            let source = [def.defines, def.body].concat();
            assert!(source.contains("#if KV_FOLD") && source.contains("KV_CSTEP"), "{}", def.stem);
            let (_, body) = mlx_ext::cuda_kernel::include_files(def, &source, 3).expect("temp dir is writable");
            assert!(body.contains("tk_shape") && body.contains("kw_shape") && body.contains("vw_shape"), "{body}");
        }
    }

    #[test]
    fn paged_splits_cover_every_sequence_up_to_the_longest() {
        // The kernel's own split of T_s: ceil(T_s / n_split) rounded up to whole tiles.
        for heads in [1usize, 8, 64, 1024] {
            for max_t in [1usize, 255, 256, 257, 5000, 131072] {
                let (n, _) = split_plan(max_t, heads);
                for t in [1, 2, 31, 32, 33, max_t / 3, max_t / 2, max_t - 1, max_t].into_iter().filter(|t| (1..=max_t).contains(t)) {
                    let per = t.div_ceil(n).div_ceil(32) * 32;
                    assert!(n * per >= t && (t - 1) / per < n, "max_t={max_t} heads={heads} t={t}: {n} x {per}");
                }
            }
        }
    }

    #[test]
    fn paged_dims_take_the_pool_layout_and_name_mismatches() {
        let f16 = |shape: &[i32]| mlx_rs::ops::zeros_dtype(shape, Dtype::Float16).unwrap();
        let u32s = |shape: &[i32]| Array::zeros::<u32>(shape).unwrap();
        let (s, hkv, rep, d, nb, block) = (3, 2, 4, 128, 7, 256);
        let (q, kn) = (f16(&[s, hkv * rep, 1, d]), f16(&[s, hkv, 1, d]));
        let (kw, vw, sb) = (u32s(&[nb, hkv, block, d * 8 / 32]), u32s(&[nb, hkv, block, d * 4 / 32]), f16(&[nb, hkv, block, d / 64]));
        let k = PagedPool { w: &kw, scales: &sb, biases: &sb, bits: 8, group: 64 };
        let v = PagedPool { w: &vw, scales: &sb, biases: &sb, bits: 4, group: 64 };
        let table = Array::zeros::<i32>(&[s, 1 + 4]).unwrap();
        let ctr = Array::zeros::<i32>(&[1024]).unwrap();
        let dims = paged_dims(&q, &kn, &kn, &k, &v, &table, &ctr, 1000).unwrap();
        assert_eq!(dims, PagedDims { s, hkv, rows: rep, d, block });
        assert!(matches!(paged_dims(&q, &kn, &kn, &k, &v, &table, &ctr, 1025), Err(KvError::Capacity { requested: 1025, capacity: 1024 })));
        let swapped = PagedPool { bits: 4, ..k };
        let err = paged_dims(&q, &kn, &kn, &swapped, &v, &table, &ctr, 10).unwrap_err().to_string();
        assert!(err.contains("key pool"), "{err}");
        let odd = u32s(&[nb, hkv, 48, d * 8 / 32]);
        let odd_sb = f16(&[nb, hkv, 48, d / 64]);
        let (ko, vo) = (PagedPool { w: &odd, scales: &odd_sb, biases: &odd_sb, ..k }, PagedPool { w: &odd, scales: &odd_sb, biases: &odd_sb, bits: 8, ..v });
        assert!(paged_dims(&q, &kn, &kn, &ko, &vo, &table, &ctr, 10).unwrap_err().to_string().contains("multiple of 32"));
        let short = Array::zeros::<i32>(&[1023]).unwrap();
        assert!(paged_dims(&q, &kn, &kn, &k, &v, &table, &short, 10).is_err());
        assert!(paged_dims(&q, &kn, &kn, &k, &v, &Array::zeros::<i32>(&[s + 1, 5]).unwrap(), &ctr, 10).is_err());
    }

    #[test]
    fn three_and_six_bits_run_on_cuda_cores() {
        for (k, v) in [(6, 6), (3, 3), (8, 6), (6, 4), (4, 3)] {
            assert!(covers(k, v, 128, 4), "k{k}v{v}");
            assert!(!mma_covers(k, 64, v, 64, 128, 4, Dtype::Float16), "k{k}v{v} has no tensor-core variant");
        }
        assert!(mma_covers(8, 64, 4, 64, 128, 4, Dtype::Float16));
        assert!(!covers(5, 5, 128, 4) && !covers(8, 5, 128, 4), "5-bit packs are 5 bytes: not read");
    }

    #[test]
    fn per_channel_key_groups_must_be_whole_tiles() {
        assert!(covers_channels(6, 64, 6, 64, 3) && covers_channels(3, 128, 2, 128, 4) && covers_channels(4, 64, 4, 256, 4));
        assert!(!covers_channels(6, 48, 6, 64, 3), "a 32-token tile would straddle two key groups");
        assert!(!covers_channels(5, 64, 4, 64, 3) && !covers_channels(6, 64, 6, 96, 3) && !covers_channels(6, 64, 6, 64, 9));
    }

    #[test]
    fn value_dims_fit_the_lanes_and_the_groups() {
        for d in [32usize, 64, 128, 256] {
            for bits in [2u8, 3, 4, 6, 8] {
                for rows in 1..=8usize {
                    for group in [32usize, 64, 128].into_iter().filter(|g| *g <= d) {
                        let vd = value_dims(d, bits, rows, group);
                        assert!(vd.is_power_of_two() && d % vd == 0, "d={d} vd={vd}");
                        assert!(d / vd <= 32, "d={d} vd={vd}: more than 32 lanes per token");
                        assert!(group % vd == 0, "vd={vd} straddles groups of {group}");
                        assert_eq!(vd * bits as usize % 8, 0, "d={d} bits={bits} rows={rows}: codes end inside a byte");
                        let bytes = vd * bits as usize / 8;
                        // 2/4/8 bits: one aligned load; 3/6 bits: one or two aligned words.
                        let loads = if bits.is_power_of_two() { matches!(bytes, 2 | 4 | 8) } else { matches!(bytes, 3 | 6) };
                        assert!(loads, "d={d} bits={bits} rows={rows}: {bytes}-byte value load");
                        assert!(rows * vd <= 64, "d={d} rows={rows} vd={vd}: too many accumulators");
                    }
                }
            }
        }
    }
}
