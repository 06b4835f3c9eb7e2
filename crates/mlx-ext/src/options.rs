//! [`EngineOptions`]: which compute path runs where there is a choice. Defaults are the engine's
//! fastest measured paths; the other values exist for comparisons and cross-checks.
//!
//! The options are per process, installed once by the front end ([`install`]) and read where
//! the path is chosen ([`current`]): the CPU kernels' thread pool and MLX's streams are per
//! process anyway, and one process serves one engine. Installing again replaces them (a
//! comparison tool may run both paths in one process), except the thread count, which is fixed
//! once the pool has started.

use crate::{ExtError, Result};
use std::sync::RwLock;

/// A path switched on or off (`on`/`off` on the command line).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Toggle {
    #[default]
    On,
    Off,
}

impl Toggle {
    pub fn on(self) -> bool {
        self == Toggle::On
    }

    pub fn from_bool(on: bool) -> Self {
        if on {
            Toggle::On
        } else {
            Toggle::Off
        }
    }

    fn name(self) -> &'static str {
        if self.on() {
            "on"
        } else {
            "off"
        }
    }
}

/// Which build of the CPU kernels runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum CpuBuild {
    /// The AVX2+FMA+F16C build where the CPU has those, else the baseline.
    #[default]
    Auto,
    /// The baseline build (for cross-checking the vector build).
    Generic,
}

/// When quantized linear layers of a GPU decode step run our matvec ([`crate::qmv`]) instead
/// of MLX's `quantized_matmul`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum GpuMatvec {
    /// Ours for weights of at least [`QMV_MIN_BYTES`], MLX's below: our launch costs more host
    /// time than MLX's op, which only a large weight's faster read repays.
    #[default]
    Auto,
    /// Ours wherever it covers the shape.
    On,
    /// MLX's everywhere.
    Off,
}

/// The smallest packed weight (codes, scales and biases) that `--gpu-matvec auto` gives our
/// matvec. Session 19 (H200, docs/gpu-whole-model-h200.md): with ours on every layer, a random
/// 4-bit Llama-3.1-8B decoded at 1.20x of MLX's (device wait 4.3 -> 2.6 ms per token, graph
/// build 1.4 -> 2.1 ms), while SmolLM2-135M, whose weights are 0.2-0.5 MB each and whose step
/// is host-bound, fell to 0.85x. An H100 probe timed 8B's 2 MB k/v projections at 6.0 us ours
/// against 7.8 us MLX's, too little to pay ~3 us more host time; its 8 MB q/o at 8.9 against
/// 21.9 us.
pub const QMV_MIN_BYTES: usize = 4 << 20;

/// How quantized model weights are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum WeightMode {
    /// Packed as in the file (MLX affine triplets); products run on packed weights.
    #[default]
    Quantized,
    /// Dequantized to the compute dtype at load: more memory, different rounding.
    Dense,
}

/// Default split target of the fused GPU decode kernel: one wave of blocks on an H200 (132 SMs,
/// two resident blocks each).
pub const DEFAULT_FUSED_BLOCKS: usize = 264;
/// Default row count up to which quantized linear layers use our matvec primitive on the CPU;
/// above it they dequantize one matrix and call BLAS (the measured crossover).
pub const DEFAULT_MATVEC_ROWS: usize = 8;

/// The engine's kernel-path choices. Every command takes them as the flags below; every bench
/// and ppl row records [`EngineOptions::describe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
#[cfg_attr(feature = "clap", command(next_help_heading = "Engine paths"))]
pub struct EngineOptions {
    /// GPU: our fused attention kernel over the packed cache (`off`: MLX ops, for comparisons)
    #[cfg_attr(feature = "clap", arg(long, global = true, value_enum, default_value_t = Toggle::On))]
    pub gpu_fused: Toggle,
    /// GPU: the fused decode step, which quantizes and writes the new token inside the attention
    /// kernel (`off`: MLX-ops cache write, then the fused attention)
    #[cfg_attr(feature = "clap", arg(long, global = true, value_enum, default_value_t = Toggle::On))]
    pub gpu_fused_step: Toggle,
    /// GPU: one launch per layer, the last block of each head merging the partial results
    /// (`off`: partial and merge kernels)
    #[cfg_attr(feature = "clap", arg(long, global = true, value_enum, default_value_t = Toggle::On))]
    pub gpu_fused_fold: Toggle,
    /// GPU: a decode step enters the cache's stored frame inside its one-launch kernel:
    /// Hadamard rotations (per-token and per-channel layers) and the key center (`off`: matmul
    /// and subtract ops around the kernel)
    #[cfg_attr(feature = "clap", arg(long, global = true, value_enum, default_value_t = Toggle::On))]
    pub gpu_fused_rotate: Toggle,
    /// GPU: tensor-core (mma) variant of the attention pass where it covers the shape
    /// (`off`: the CUDA-core variant)
    #[cfg_attr(feature = "clap", arg(long, global = true, value_enum, default_value_t = Toggle::On))]
    pub gpu_fused_mma: Toggle,
    /// GPU: how many blocks the fused kernel aims to split the cache into
    #[cfg_attr(feature = "clap", arg(long, global = true, default_value_t = DEFAULT_FUSED_BLOCKS, value_parser = positive))]
    pub gpu_fused_blocks: usize,
    /// GPU: our matvec kernel for quantized linear layers in decode (1-8 rows, 4- and 8-bit
    /// weights; `auto`: for weights of 4 MiB and more; `off`: MLX's quantized_matmul)
    #[cfg_attr(feature = "clap", arg(long, global = true, value_enum, default_value_t = GpuMatvec::Auto))]
    pub gpu_matvec: GpuMatvec,
    /// GPU: a prefill chunk over a packed cache widens this layer's packed runs to the compute
    /// dtype and attends with MLX's sdpa (`off`: blocks of dequantize + matmul merged by an
    /// online softmax)
    #[cfg_attr(feature = "clap", arg(long, global = true, value_enum, default_value_t = Toggle::On))]
    pub gpu_prefill: Toggle,
    /// Prefill chunks of 256 tokens or more are queued for the device layer by layer, so each
    /// layer's temporaries can be freed while later layers are built (`off`: one evaluation per
    /// chunk). H100, random Llama-3.1-8B q4, k8v4: peak 16.26 -> 4.73 GiB at a 2K prompt (12.95 at
    /// 8K, 16.67 at 32K) for 0.90 / 0.98 / 1.03x the prefill speed; CPU: no slower.
    #[cfg_attr(feature = "clap", arg(long, global = true, value_enum, default_value_t = Toggle::On))]
    pub layer_eval: Toggle,
    /// CPU: our primitives (packed matvec, decode attention, RMSNorm, RoPE) instead of MLX's
    /// CPU ops (`off`: MLX ops only)
    #[cfg_attr(feature = "clap", arg(long, global = true, value_enum, default_value_t = Toggle::On))]
    pub cpu_kernels: Toggle,
    /// CPU: prefill chunks over a packed per-token cache attend in our causal primitive (`off`:
    /// the block path of MLX ops and BLAS)
    #[cfg_attr(feature = "clap", arg(long, global = true, value_enum, default_value_t = Toggle::On))]
    pub cpu_prefill: Toggle,
    /// CPU: threads of our primitives' pool (0: one per core)
    #[cfg_attr(feature = "clap", arg(long, global = true, default_value_t = 0))]
    pub cpu_threads: usize,
    /// CPU: which build of our primitives runs
    #[cfg_attr(feature = "clap", arg(long, global = true, value_enum, default_value_t = CpuBuild::Auto))]
    pub cpu_build: CpuBuild,
    /// CPU: up to this many rows, quantized linear layers use the packed matvec; above it one
    /// matrix is dequantized for BLAS
    #[cfg_attr(feature = "clap", arg(long, global = true, default_value_t = DEFAULT_MATVEC_ROWS, value_parser = positive))]
    pub cpu_matvec_rows: usize,
    /// Quantized model weights: kept packed, or dequantized at load
    #[cfg_attr(feature = "clap", arg(long, global = true, value_enum, default_value_t = WeightMode::Quantized))]
    pub weights: WeightMode,
    /// Projections of one input (q/k/v; gate/up) whose weights share storage (dtype, or bits
    /// and group) are joined at load and run as one product (`off`: one product each)
    #[cfg_attr(feature = "clap", arg(long, global = true, value_enum, default_value_t = Toggle::On))]
    pub fuse_projections: Toggle,
    /// Time graph building per layer part in the caches' decode step (bench reports it)
    #[cfg_attr(feature = "clap", arg(long, global = true))]
    pub host_profile: bool,
}

/// Options added after result rows began recording them, with the behaviour rows from before
/// ran (not necessarily today's default): `gpu-fused-rotate` came in off and is on now; prefill
/// chunks took the block path before `cpu-prefill` existed; GPU decode used MLX's
/// quantized_matmul before `gpu-matvec`; every projection was its own product before
/// `fuse-projections`; GPU prefill chunks over a packed cache took the block path before
/// `gpu-prefill`, and each chunk was one evaluation before `layer-eval`; every row ran in one process before `tensor-parallel` (which result
/// rows append to this list).
pub const BEFORE_OPTION: &[(&str, &str)] = &[("gpu-fused-rotate", "off"), ("cpu-prefill", "off"), ("gpu-matvec", "off"), ("fuse-projections", "off"), ("gpu-prefill", "off"), ("layer-eval", "off"), ("tensor-parallel", "1")];

/// The defaults: the fastest measured paths.
pub const DEFAULTS: EngineOptions = EngineOptions {
    gpu_fused: Toggle::On,
    gpu_fused_step: Toggle::On,
    gpu_fused_fold: Toggle::On,
    gpu_fused_rotate: Toggle::On,
    gpu_fused_mma: Toggle::On,
    gpu_fused_blocks: DEFAULT_FUSED_BLOCKS,
    gpu_matvec: GpuMatvec::Auto,
    gpu_prefill: Toggle::On,
    layer_eval: Toggle::On,
    cpu_kernels: Toggle::On,
    cpu_prefill: Toggle::On,
    cpu_threads: 0,
    cpu_build: CpuBuild::Auto,
    cpu_matvec_rows: DEFAULT_MATVEC_ROWS,
    weights: WeightMode::Quantized,
    fuse_projections: Toggle::On,
    host_profile: false,
};

impl Default for EngineOptions {
    fn default() -> Self {
        DEFAULTS
    }
}

impl EngineOptions {
    /// One `key=value` list for result rows; two rows pair only when these are equal. Threads
    /// appear as requested (`0` = one per core), so rows stay comparable across machines that
    /// differ only in their core count.
    pub fn describe(&self) -> String {
        format!(
            "gpu-fused={} gpu-fused-step={} gpu-fused-fold={} gpu-fused-rotate={} gpu-fused-mma={} gpu-fused-blocks={} gpu-matvec={} gpu-prefill={} layer-eval={} cpu-kernels={} cpu-prefill={} cpu-threads={} cpu-build={} cpu-matvec-rows={} weights={} fuse-projections={} host-profile={}",
            self.gpu_fused.name(),
            self.gpu_fused_step.name(),
            self.gpu_fused_fold.name(),
            self.gpu_fused_rotate.name(),
            self.gpu_fused_mma.name(),
            self.gpu_fused_blocks,
            match self.gpu_matvec {
                GpuMatvec::Auto => "auto",
                GpuMatvec::On => "on",
                GpuMatvec::Off => "off",
            },
            self.gpu_prefill.name(),
            self.layer_eval.name(),
            self.cpu_kernels.name(),
            self.cpu_prefill.name(),
            self.cpu_threads,
            match self.cpu_build {
                CpuBuild::Auto => "auto",
                CpuBuild::Generic => "generic",
            },
            self.cpu_matvec_rows,
            match self.weights {
                WeightMode::Quantized => "quantized",
                WeightMode::Dense => "dense",
            },
            self.fuse_projections.name(),
            if self.host_profile { "on" } else { "off" },
        )
    }

    /// The `key=value` pairs where two `describe` strings differ, as `key: a vs b`. A key one
    /// side lacks takes the value in [`BEFORE_OPTION`] (what rows recorded before the option
    /// existed ran), else reads `(absent)`.
    pub fn differences(a: &str, b: &str) -> Vec<String> {
        let pairs = |s: &str| -> Vec<(String, String)> {
            s.split_whitespace().filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        let (pa, pb) = (pairs(a), pairs(b));
        let value = |side: &[(String, String)], k: &str| -> String {
            side.iter()
                .find(|(kk, _)| kk == k)
                .map(|(_, v)| v.as_str())
                .or_else(|| BEFORE_OPTION.iter().find(|(kk, _)| *kk == k).map(|(_, v)| *v))
                .unwrap_or("(absent)")
                .to_string()
        };
        let mut keys: Vec<&str> = pa.iter().map(|(k, _)| k.as_str()).collect();
        keys.extend(pb.iter().map(|(k, _)| k.as_str()).filter(|k| !pa.iter().any(|(ka, _)| ka == k)));
        keys.into_iter()
            .filter_map(|k| {
                let (va, vb) = (value(&pa, k), value(&pb, k));
                (va != vb).then(|| format!("{k}: {va} vs {vb}"))
            })
            .collect()
    }
}

/// A whole number of at least 1 (for counts that 0 would make meaningless).
#[cfg(feature = "clap")]
fn positive(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("{s:?} is not a whole number of at least 1")),
    }
}

static OPTIONS: RwLock<EngineOptions> = RwLock::new(DEFAULTS);

/// Makes `opts` the process's options. Fails, naming `--cpu-threads`, when the CPU kernels'
/// pool already runs another thread count.
pub fn install(opts: EngineOptions) -> Result<()> {
    blas_kernels();
    let rc = unsafe { crate::ffi::kvsplit_ext_configure(opts.cpu_threads as i32, opts.cpu_build == CpuBuild::Generic) };
    if rc != 0 {
        return Err(ExtError::Option { flag: "--cpu-threads", message: crate::ffi::last_error() });
    }
    *OPTIONS.write().unwrap_or_else(|e| e.into_inner()) = opts;
    Ok(())
}

/// Which BLAS kernels MLX's CPU matmuls run on, e.g. `OpenBLAS SkylakeX kernels (its detection
/// fell back to Prescott)`; empty when MLX's BLAS is not OpenBLAS. The first call (made by
/// [`install`], before any matmul) moves OpenBLAS off its SSE3 Prescott fallback onto the AVX-512
/// or AVX2 kernels where this CPU has them and OpenBLAS did not recognise it (csrc/blas.cpp); a
/// user's own `OPENBLAS_CORETYPE` is left alone.
pub fn blas_kernels() -> String {
    let p = unsafe { crate::ffi::kvsplit_blas_select() };
    if p.is_null() {
        return String::new();
    }
    unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// The options in force (the defaults until [`install`]).
pub fn current() -> EngineOptions {
    *OPTIONS.read().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a CPU with AVX2, MLX's OpenBLAS must not run its SSE3 Prescott kernels after
    /// `install` (unless the user forced them): they made prefill 0.66x slower on the project's
    /// AVX-512 Xeon, whose model OpenBLAS 0.3.21 does not know.
    #[test]
    fn openblas_leaves_its_prescott_fallback_where_the_cpu_has_avx2() {
        install(EngineOptions::default()).unwrap();
        let blas = blas_kernels();
        #[cfg(target_arch = "x86_64")]
        if blas.starts_with("OpenBLAS") && std::is_x86_feature_detected!("avx2") && std::env::var_os("OPENBLAS_CORETYPE").is_none() {
            assert!(!blas.starts_with("OpenBLAS Prescott"), "{blas}");
        }
        assert_eq!(blas, blas_kernels(), "chosen once per process");
    }

    #[test]
    fn describe_lists_every_option_and_differences_name_them() {
        let a = EngineOptions::default();
        let b = EngineOptions { gpu_fused_step: Toggle::Off, weights: WeightMode::Dense, ..a };
        let (da, db) = (a.describe(), b.describe());
        assert_eq!(da.split_whitespace().count(), 17, "{da}");
        assert!(da.contains(" fuse-projections=on "), "{da}");
        assert!(EngineOptions::differences(&da, &da).is_empty());
        assert_eq!(EngineOptions::differences(&da, &db), vec!["gpu-fused-step: on vs off".to_string(), "weights: quantized vs dense".to_string()]);
        assert_eq!(EngineOptions::differences("a=1", "a=1 b=2"), vec!["b: (absent) vs 2".to_string()]);
        // A row from before gpu-fused-rotate existed ran the rotations as matmul ops (off).
        let older = da.replace(" gpu-fused-rotate=on", "");
        assert_ne!(older, da);
        let unrotated = da.replace("gpu-fused-rotate=on", "gpu-fused-rotate=off");
        assert!(EngineOptions::differences(&older, &unrotated).is_empty());
        assert_eq!(EngineOptions::differences(&older, &da), vec!["gpu-fused-rotate: off vs on".to_string()]);
    }
}
