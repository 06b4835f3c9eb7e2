//! Attention over a cache made of segments (sinks, quantized body, full-precision tail).
//!
//! Which path runs is decided here, in [`choose`] (a layer's attention) and [`choose_step`] (the
//! cache's one-token decode step, which also writes the token), and nowhere else. Each
//! [`Choice`] says why, for `bench` rows and `--verbose` lines. The paths sit below this module
//! and never import each other; the types they share sit below them:
//!
//! ```text
//!            mod.rs (choose, choose_step, run)
//!        /         |             \
//!   mlx_ops.rs   cpu.rs        fused.rs
//!   (MLX ops)    (CPU blocks,  (fused CUDA
//!                 our primitive) kernels)
//!        \         |             /
//!              types.rs (segments, masks, packed operands)
//! ```
//!
//! On Metal the MLX-ops path runs (MLX implements it there); there is no fused Metal kernel.

pub mod cpu;
pub mod fused;
pub mod mlx_ops;
pub mod types;

pub use types::{causal_visible, Mask, PackedOperand, Scoring, Segment, Tensor};

use crate::error::{KvError, Result};
use crate::Backend;
use mlx_rs::Array;
use types::{causal_packed_body, channel_packed_body, single_packed_body};

/// A way of computing attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// MLX's `scaled_dot_product_attention` over float segments.
    Sdpa,
    /// MLX's `quantized_matmul` over packed segments.
    MlxQuantized,
    /// A GPU prefill chunk: this layer's packed runs widened, then MLX's sdpa.
    WidenedSdpa,
    /// Our fused CUDA decode kernel over the packed buffers.
    FusedGpu,
    /// Our fused CUDA decode step: quantizes and writes the new token, then attends, in one launch.
    FusedStep,
    /// Our CPU decode primitive over the packed buffers.
    CpuPrimitive,
    /// Our CPU causal primitive for a prefill chunk over the packed buffers or a 16-bit dense body.
    CpuPrefill,
    /// Our CPU decode step: quantizes and writes the new token in place, then attends, in one op.
    CpuStep,
    /// Blocks of MLX ops on the CPU (packed codes widened one block at a time).
    CpuBlocks,
    /// Our CPU primitive over pool blocks, every sequence of a decode step in one op.
    PagedCpu,
    /// Our fused CUDA step over pool blocks: writes every sequence's token and attends, one
    /// launch per layer.
    PagedStep,
}

impl Path {
    pub fn name(self) -> &'static str {
        match self {
            Path::Sdpa => "sdpa",
            Path::MlxQuantized => "mlx-quantized",
            Path::WidenedSdpa => "widened-sdpa",
            Path::FusedGpu => "fused-gpu",
            Path::FusedStep => "fused-step",
            Path::CpuPrimitive => "cpu-primitive",
            Path::CpuStep => "cpu-step",
            Path::CpuPrefill => "cpu-prefill",
            Path::CpuBlocks => "cpu-blocks",
            Path::PagedCpu => "paged-cpu",
            Path::PagedStep => "paged-step",
        }
    }
}

/// A path and the reason it was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    pub path: Path,
    pub why: &'static str,
}

impl std::fmt::Display for Choice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.path.name(), self.why)
    }
}

fn pick(path: Path, why: &'static str) -> Choice {
    Choice { path, why }
}

/// Whether our fused CUDA kernels may run at all: GPU backend, not Metal, `--gpu-fused on`.
fn fused_allowed() -> std::result::Result<(), &'static str> {
    if cfg!(target_os = "macos") {
        return Err("no fused Metal kernel");
    }
    if Backend::current() != Backend::Gpu {
        return Err("not on the GPU");
    }
    if !mlx_ext::options::current().gpu_fused.on() {
        return Err("--gpu-fused off");
    }
    Ok(())
}

/// The path for attention of `q` (`[B, Hq, L, D]`) over `segments`. Every CPU path applies a
/// soft cap; on CUDA a capped layer runs MLX ops ([`mlx_ops::quantized`], float segments
/// included): MLX's fused sdpa has no cap, and neither have our fused kernels yet. Learned sink
/// logits (`sinks`, `[Hq]`) take the CPU block path on the CPU and MLX ops (or MLX's sdpa, which
/// takes sinks) elsewhere: the body matchers in [`types`] refuse a layer with sinks, so neither
/// our primitives nor our fused kernels are chosen for it ([`run`] refuses them too).
pub fn choose(q: &Array, segments: &[Segment], mask: &Mask, sinks: Option<&Array>, scoring: Scoring) -> Choice {
    let qs = q.shape();
    let d = qs[3] as usize;
    let body = single_packed_body(segments, mask, sinks);
    if Backend::current() == Backend::Cpu {
        if !mlx_ext::options::current().cpu_kernels.on() {
            return pick(Path::CpuBlocks, "--cpu-kernels off");
        }
        // A lone float segment is a dense cache (16-bit on the CPU) or a quantized cache whose
        // tokens all wait in its f32 tail; the primitive reads the former.
        if types::dense_body(segments, mask, sinks).is_some_and(|(k, _)| cpu::dense_primitive_covers(k, d)) {
            return pick(Path::CpuPrimitive, "one 16-bit dense body, no mask or sinks");
        }
        let prefill = mlx_ext::options::current().cpu_prefill.on();
        if let Some((k, v, len, _)) = causal_packed_body(segments, mask, sinks) {
            if prefill && cpu::primitive_covers(&k, &v, d) && qs[2] as usize <= len {
                return pick(Path::CpuPrefill, "a causal chunk over one packed per-token body");
            }
        }
        if let Some((k, _)) = types::causal_dense_body(segments, mask, sinks) {
            if prefill && cpu::dense_primitive_covers(k, d) && qs[2] <= k.shape()[2] {
                return pick(Path::CpuPrefill, "a causal chunk over one 16-bit dense body");
            }
        }
        return match body {
            Some((k, v, _, _)) if cpu::primitive_covers(&k, &v, d) => pick(Path::CpuPrimitive, "one packed per-token body, no mask or sinks"),
            Some(_) => pick(Path::CpuBlocks, "widths or groups the primitive does not read"),
            None => match channel_packed_body(segments, mask, sinks) {
                Some(b) if cpu::channel_primitive_covers(&b, d) => {
                    pick(Path::CpuPrimitive, "one packed per-channel body and its float sinks and tail, no mask")
                }
                Some(_) => pick(Path::CpuBlocks, "widths or groups the primitive does not read"),
                None => pick(Path::CpuBlocks, "float, masked or windowed cache, sinks, or a per-token body with a tail"),
            },
        };
    }
    if scoring.softcap.is_some() {
        return pick(Path::MlxQuantized, "soft-capped scores: neither MLX's sdpa nor our fused kernels cap them");
    }
    if segments.iter().all(|s| matches!((&s.k, &s.v), (Tensor::Float(_), Tensor::Float(_)))) {
        return pick(Path::Sdpa, "every segment in float");
    }
    let rows = (qs[1] / types::kv_heads(segments) * qs[2]) as usize;
    // A chunk of query tokens with more rows than the quantized kernels take is a prefill chunk:
    // MLX ops would dequantize it block by block, our kernels read decode rows only. A decode
    // token never widens the window, whatever its GQA rows.
    if qs[2] > 1 && !Backend::current().qmm_rows_ok(rows) && mlx_ext::options::current().gpu_prefill.on() {
        return pick(Path::WidenedSdpa, "a prefill chunk: this layer's packed runs widened, then MLX's sdpa");
    }
    let Some((k, v, _, _)) = body else {
        let Some(b) = channel_packed_body(segments, mask, sinks).filter(|b| b.sink.is_none_or(|(k, _)| k.shape()[2] as usize <= fused::MAX_SINKS)) else {
            return pick(Path::MlxQuantized, "several segments (or more sink tokens than the kernel's tile), a mask, or learned sinks");
        };
        if let Err(why) = fused_allowed() {
            return pick(Path::MlxQuantized, why);
        }
        if !fused::covers_channels(b.k.bits, b.k.group, b.v.bits, d, rows) {
            return pick(Path::MlxQuantized, "per-channel widths, key groups, head_dim or query rows the fused kernel does not cover");
        }
        return pick(Path::FusedGpu, "one packed per-channel body and its float sinks and tail, no mask");
    };
    if let Err(why) = fused_allowed() {
        return pick(Path::MlxQuantized, why);
    }
    if !fused::covers(k.bits, v.bits, d, rows) {
        return pick(Path::MlxQuantized, "widths, head_dim or query rows the fused kernel does not cover");
    }
    pick(Path::FusedGpu, "one packed per-token body, no mask or sinks")
}

/// Runs `choice` (from [`choose`] on the same arguments).
pub fn run(choice: Choice, q: &Array, segments: &[Segment], mask: &Mask, scoring: Scoring, sinks: Option<&Array>) -> Result<Array> {
    let scale = scoring.scale;
    // Our primitives and fused kernels have no sink logit in their softmax; `choose` never hands
    // them one, and a dispatch bug must fail rather than attend without it.
    if sinks.is_some() && matches!(choice.path, Path::CpuPrimitive | Path::CpuPrefill | Path::FusedGpu) {
        return Err(KvError::PathUnsupported { path: choice.path.name(), what: "learned attention sinks" });
    }
    match choice.path {
        Path::Sdpa => mlx_ops::sdpa(q, segments, mask, scoring, sinks),
        Path::MlxQuantized => mlx_ops::quantized(q, segments, mask, scoring, sinks),
        Path::WidenedSdpa => mlx_ops::widened(q, segments, mask, scoring, sinks),
        Path::CpuBlocks => cpu::blocks(q, segments, mask, scoring, sinks),
        Path::CpuPrimitive => match (single_packed_body(segments, mask, sinks), types::dense_body(segments, mask, sinks)) {
            (Some((k, v, len, _)), _) => cpu::primitive(q, k, v, len, scoring),
            (None, Some((k, v))) => cpu::primitive_dense(q, k, v, scoring),
            (None, None) => {
                let b = channel_packed_body(segments, mask, sinks).expect("the CPU primitive needs one packed body");
                cpu::primitive_channels(q, &b, scoring)
            }
        },
        Path::CpuPrefill => match (causal_packed_body(segments, mask, sinks), types::causal_dense_body(segments, mask, sinks)) {
            (Some((k, v, len, _)), _) => cpu::primitive_prefill(q, k, v, len, scoring),
            (None, Some((k, v))) => cpu::primitive_dense_prefill(q, k, v, scoring),
            (None, None) => unreachable!("the CPU prefill primitive is chosen for one packed or dense body"),
        },
        Path::FusedGpu if scoring.softcap.is_some() => Err(KvError::PathUnsupported { path: choice.path.name(), what: "attention logit soft-capping" }),
        Path::FusedGpu => match single_packed_body(segments, mask, sinks) {
            Some((k, v, len, cap)) => fused::attend(q, k, v, len, cap, scale),
            None => {
                let b = channel_packed_body(segments, mask, sinks).expect("the fused kernel needs one packed body");
                fused::attend_channels(q, &b, scale)
            }
        },
        Path::FusedStep | Path::CpuStep => unreachable!("decode steps run through the cache (choose_step)"),
        Path::PagedCpu | Path::PagedStep => unreachable!("paged steps run through crate::batch (choose_paged)"),
    }
}

/// [`choose`] then [`run`].
pub fn attend(q: &Array, segments: &[Segment], mask: &Mask, scoring: Scoring, sinks: Option<&Array>) -> Result<Array> {
    run(choose(q, segments, mask, sinks, scoring), q, segments, mask, scoring, sinks)
}

/// What the cache knows about one decode token before it writes it.
pub struct StepCase {
    /// One new token and one query position, going straight into a quantized per-token body
    /// (no sinks, residual tail, ring or learned sinks; quantization started). A Hadamard rotation
    /// is applied around the step by the cache.
    pub direct: bool,
    pub k_bits: u8,
    pub k_group: usize,
    pub v_bits: u8,
    pub v_group: usize,
    pub head_dim: usize,
    /// Query rows per KV head (GQA), `None` if the heads do not divide.
    pub rows: Option<usize>,
    /// The layer soft-caps its scores ([`Scoring::softcap`]): only the CPU step applies that.
    pub softcap: bool,
}

/// `Some(FusedStep)` (CUDA) or `Some(CpuStep)` when the cache should hand the token to a decode
/// step that writes it and attends in one op; `None` when it writes the token with MLX ops and
/// then calls [`choose`].
pub fn choose_step(case: &StepCase) -> Option<Choice> {
    if !case.direct {
        return None;
    }
    if Backend::current() == Backend::Cpu {
        let ok = mlx_ext::options::current().cpu_kernels.on()
            && case.rows.is_some()
            && mlx_ext::cpu::supports(case.k_bits, case.k_group, case.head_dim)
            && mlx_ext::cpu::supports(case.v_bits, case.v_group, case.head_dim);
        return ok.then(|| pick(Path::CpuStep, "one new token into a quantized per-token body"));
    }
    if !mlx_ext::options::current().gpu_fused_step.on() || case.softcap {
        return None;
    }
    fused_allowed().ok()?;
    let rows = case.rows?;
    fused::covers(case.k_bits, case.v_bits, case.head_dim, rows).then(|| pick(Path::FusedStep, "one new token into a quantized per-token body"))
}

/// `Some(FusedStep)` when a per-channel cache should hand its decode token to the fused
/// per-channel step ([`fused::step_channels`]: the token written into the float tail and
/// attention over body and tail in one launch), `Some(CpuStep)` for the CPU's op of the same
/// job ([`mlx_ext::cpu::channel_decode_step`], rotations and soft cap included); `None` when it
/// writes the token with MLX ops and then calls [`choose`]. `direct` as in [`StepCase`], for a
/// per-channel cache whose tail has room for the token without a group flush; on CUDA never
/// for soft-capped scores (`softcap`).
#[allow(clippy::too_many_arguments)]
pub fn choose_channel_step(direct: bool, k_bits: u8, k_group: usize, v_bits: u8, v_group: usize, head_dim: usize, rows: Option<usize>, softcap: bool) -> Option<Choice> {
    if !direct {
        return None;
    }
    if Backend::current() == Backend::Cpu {
        // Key groups run along tokens and must tile the buffers (grown STEP tokens at a time);
        // the op rotates by the fast transform, which needs a power-of-two head_dim.
        let ok = mlx_ext::options::current().cpu_kernels.on()
            && rows.is_some()
            && mlx_ext::cpu::supports(k_bits, k_group, crate::store::STEP)
            && mlx_ext::cpu::supports(v_bits, v_group, head_dim)
            && head_dim.is_power_of_two();
        return ok.then(|| pick(Path::CpuStep, "one new token into a per-channel cache's float tail"));
    }
    if softcap || !mlx_ext::options::current().gpu_fused_step.on() {
        return None;
    }
    fused_allowed().ok()?;
    fused::covers_channels(k_bits, k_group, v_bits, head_dim, rows?).then(|| pick(Path::FusedStep, "one new token into a per-channel cache's float tail"))
}

/// Whether this backend's fast decode path reads a cache of `spec` (query rows aside): on the
/// CPU our primitive, on CUDA the fused kernel (keys per token or per channel, see
/// [`fused::covers_channels`]). True where no fast path would run anyway (Metal,
/// `--gpu-fused off`), since every setting then takes MLX's ops alike.
pub fn fast_path_reads(spec: &crate::KvSpec, head_dim: usize) -> bool {
    if !spec.k.is_quantized() || !spec.v.is_quantized() {
        return true;
    }
    let per_token = spec.key_layout != crate::KeyLayout::PerChannel;
    if Backend::current() == Backend::Cpu {
        // Per-channel key groups run along tokens: they must tile the buffers, which grow in
        // steps of STEP tokens. Sink tokens are read beside a per-channel body only.
        let k_len = if per_token { head_dim } else { crate::store::STEP };
        return !mlx_ext::options::current().cpu_kernels.on()
            || (mlx_ext::cpu::supports(spec.k.bits, spec.k.group, k_len)
                && mlx_ext::cpu::supports(spec.v.bits, spec.v.group, head_dim)
                && (spec.sinks == 0 || !per_token));
    }
    // Sink tokens are read beside a per-channel body only (one tile of them).
    fused_allowed().is_err()
        || if per_token {
            spec.sinks == 0 && fused::covers(spec.k.bits, spec.v.bits, head_dim, 1)
        } else {
            spec.sinks <= fused::MAX_SINKS && fused::covers_channels(spec.k.bits, spec.k.group, spec.v.bits, head_dim, 1)
        }
}

/// Whether a preset may run a recipe with this layer setting by default: the fast path reads it
/// and the step does not fall back to MLX ops around the kernel. On CUDA a per-channel layer's
/// decode step is one launch ([`fused::step_channels`]: the token written into the float tail in
/// place, the Hadamard rotations inside with `--gpu-fused-rotate on`); with the rotations as
/// matmul ops instead, SmolLM2's k8v4 recipe decoded at about half of plain k8v4 at 4K on an
/// H100, and with them inside at 0.80-0.88x (docs/fused-attention-h200.md, session 13; 0.82x in
/// session 14). Rotated per-token layers enter their frame inside [`fused::decode_step`] with
/// the option on, and are never refused.
pub fn preset_may_use(spec: &crate::KvSpec, head_dim: usize) -> bool {
    let slow_step = fused_allowed().is_ok()
        && spec.k.is_quantized()
        && spec.key_layout == crate::KeyLayout::PerChannel
        && spec.rotation != crate::Rotation::None
        && !mlx_ext::options::current().gpu_fused_rotate.on();
    fast_path_reads(spec, head_dim) && !slow_step
}

/// The path for a decode step of sequences whose caches live in pool blocks of these widths
/// (`crate::batch`); `None` when each sequence writes its token with MLX ops and attends over
/// its gathered blocks instead. Per-channel keys (`k_channels`, groups of `k_group` tokens)
/// have a paged path on the CPU only; on CUDA they attend over the gathered blocks (the fused
/// per-channel kernel where it covers them, through [`choose`]), as do soft-capped layers
/// (`softcap`), which the paged CUDA step does not cap.
#[allow(clippy::too_many_arguments)]
pub fn choose_paged(k_bits: u8, k_group: usize, k_channels: bool, v_bits: u8, v_group: usize, head_dim: usize, rows: usize, softcap: bool) -> Option<Choice> {
    if Backend::current() == Backend::Cpu {
        let k_len = if k_channels { crate::pool::BLOCK } else { head_dim };
        let ok = mlx_ext::options::current().cpu_kernels.on()
            && mlx_ext::cpu::supports(k_bits, k_group, k_len)
            && mlx_ext::cpu::supports(v_bits, v_group, head_dim);
        return ok.then(|| pick(Path::PagedCpu, "decode tokens into pool blocks, one op per layer for the batch"));
    }
    if k_channels || softcap || !mlx_ext::options::current().gpu_fused_step.on() {
        return None;
    }
    fused_allowed().ok()?;
    fused::covers(k_bits, v_bits, head_dim, rows).then(|| pick(Path::PagedStep, "decode tokens into pool blocks, one launch per layer for the batch"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{KeyLayout, KvSpec};

    #[test]
    fn the_cpu_fast_path_reads_per_token_widths_it_unpacks() {
        if Backend::current() != Backend::Cpu || !mlx_ext::options::current().cpu_kernels.on() {
            return;
        }
        assert!(fast_path_reads(&KvSpec::bits(8, 4), 64));
        assert!(fast_path_reads(&KvSpec::bits(6, 3), 64));
        assert!(fast_path_reads(&KvSpec::dense(), 64));
        assert!(!fast_path_reads(&KvSpec::bits(5, 4), 64), "no 5-bit unpack");
        let mut pc = KvSpec::bits(4, 4);
        pc.key_layout = KeyLayout::PerChannel;
        assert!(fast_path_reads(&pc, 64), "per-channel keys take the primitive too");
        assert!(preset_may_use(&pc, 64), "on the CPU a preset may run a per-channel recipe");
        pc.k.bits = 3;
        pc.k.group = 32;
        assert!(!fast_path_reads(&pc, 64), "3-bit codes come in units of 64 tokens");
        pc.k.bits = 4;
        pc.key_layout = KeyLayout::Centered;
        assert!(fast_path_reads(&pc, 64));
    }

    /// Our fused CUDA kernels apply no soft cap: handed one they fail before any launch, and
    /// never attend with plain scores. (`choose` does not hand them one; this box cannot show
    /// that branch, which runs on CUDA only.)
    #[test]
    fn a_fused_path_refuses_a_soft_cap() {
        let q = Array::zeros::<f32>(&[1, 2, 1, 64]).unwrap();
        let choice = pick(Path::FusedGpu, "test");
        let err = run(choice, &q, &[], &Mask::None, Scoring::capped(0.125, 50.0), None).unwrap_err().to_string();
        assert!(err.contains("fused-gpu") && err.contains("soft-capping"), "{err}");
    }

    /// Learned sink logits (gpt-oss) join the softmax of the MLX-ops and CPU block paths only:
    /// handed one, the primitives and fused kernels fail before reading anything.
    #[test]
    fn primitives_and_fused_paths_refuse_learned_sinks() {
        let q = Array::zeros::<f32>(&[1, 2, 1, 64]).unwrap();
        let sinks = Array::zeros::<f32>(&[2]).unwrap();
        for path in [Path::FusedGpu, Path::CpuPrimitive, Path::CpuPrefill] {
            let err = run(pick(path, "test"), &q, &[], &Mask::None, Scoring::from(0.125), Some(&sinks)).unwrap_err().to_string();
            assert!(err.contains(path.name()) && err.contains("learned attention sinks"), "{err}");
        }
    }

    #[test]
    fn the_cpu_pool_reads_per_channel_keys_whose_groups_tile_a_block() {
        if Backend::current() != Backend::Cpu || !mlx_ext::options::current().cpu_kernels.on() {
            return;
        }
        let paged = |k_bits, k_group, channels| choose_paged(k_bits, k_group, channels, 4, 64, 64, 1, false).map(|c| c.path);
        assert_eq!(paged(4, 64, true), Some(Path::PagedCpu));
        assert_eq!(paged(3, 64, true), Some(Path::PagedCpu), "3-bit units of 64 tokens tile 256");
        assert_eq!(paged(6, 128, true), Some(Path::PagedCpu));
        assert_eq!(paged(4, 96, true), None, "groups of 96 tokens do not tile a 256-token block");
        assert_eq!(paged(3, 32, true), None, "3-bit codes come in units of 64 tokens");
        assert_eq!(paged(8, 64, false), Some(Path::PagedCpu));
    }
}
