//! `kvsplit-mlx convert`: write an MLX model directory (mlx-community layout) from a GGUF file or
//! an HF/MLX safetensors directory, optionally (re)quantized like `mlx_lm.convert -q`.

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use mlx_rs::Dtype;
use models::mlx_dir::{self, ConvertOptions, MixedRecipe, QuantPlan};
use models::load::safetensors::QuantSpec;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// Source model: a `.gguf` file, an HF/MLX safetensors directory, or a Hub id (owner/name).
    #[arg(long, alias = "hf-path")]
    pub from: String,
    /// Output directory; written atomically (a temporary directory renamed into place).
    #[arg(long, alias = "mlx-path")]
    pub out: PathBuf,
    /// Dtype of dense float tensors: f16, bf16 or f32 (default: keep each tensor's source
    /// precision; tensors dequantized from GGUF k-quants are written f32, which is exact).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Quantize 2-D weights (affine, like `mlx_lm.convert -q`); GGUF Q4_0/Q4_1/Q8_0 tensors
    /// with another setting are re-quantized from their dequantized values.
    #[arg(short = 'q', long)]
    pub quantize: bool,
    /// Bits per weight with -q: 2, 3, 4, 5, 6 or 8.
    #[arg(long, default_value_t = 4)]
    pub q_bits: i32,
    /// Weights sharing one scale and bias with -q: 32, 64 or 128.
    #[arg(long, default_value_t = 64)]
    pub q_group_size: i32,
    /// Mixed-precision recipe, as in mlx-lm: mixed_2_6, mixed_3_4, mixed_3_6 or mixed_4_6
    /// (low_high bits: high for lm_head and for v_proj/down_proj in the first and last eighth
    /// of the layers and every third layer between, low elsewhere; replaces --q-bits).
    /// Implies -q.
    #[arg(long)]
    pub quant_predicate: Option<String>,
    /// Bits for the token embedding and lm_head (2, 3, 4, 5, 6 or 8), which suffer most from
    /// rounding; the rest follows --q-bits or --quant-predicate. Default: no exception. Implies -q.
    #[arg(long)]
    pub q_embed_bits: Option<i32>,
    /// Largest safetensors file before the weights are split into shards (with an index),
    /// e.g. 5GB, 500MB, 2GiB.
    #[arg(long, default_value = "5GB")]
    pub max_shard_size: String,
    /// Write every weight dense (dequantizing quantized ones).
    #[arg(short = 'd', long, conflicts_with_all = ["quantize", "quant_predicate", "q_embed_bits"])]
    pub dequantize: bool,
    /// Replace --out if it exists.
    #[arg(long)]
    pub force: bool,
}

fn parse_dtype(s: &str) -> Result<Dtype> {
    Ok(match s {
        "f16" | "float16" => Dtype::Float16,
        "bf16" | "bfloat16" => Dtype::Bfloat16,
        "f32" | "float32" => Dtype::Float32,
        other => bail!("--dtype: '{other}' is not one of f16, bf16, f32"),
    })
}

const BITS: [i32; 6] = [2, 3, 4, 5, 6, 8];

fn options(a: &ConvertArgs) -> Result<ConvertOptions> {
    let quantize = if a.quantize || a.quant_predicate.is_some() || a.q_embed_bits.is_some() {
        if !BITS.contains(&a.q_bits) {
            bail!("--q-bits: {} is not one of 2, 3, 4, 5, 6, 8", a.q_bits);
        }
        if ![32, 64, 128].contains(&a.q_group_size) {
            bail!("--q-group-size: {} is not one of 32, 64, 128", a.q_group_size);
        }
        let mixed = match a.quant_predicate.as_deref() {
            None => None,
            Some(name) => Some(MixedRecipe::parse(name).with_context(|| {
                format!("--quant-predicate: '{name}' is not one of {}", MixedRecipe::NAMES.join(", "))
            })?),
        };
        if let Some(b) = a.q_embed_bits.filter(|b| !BITS.contains(b)) {
            bail!("--q-embed-bits: {b} is not one of 2, 3, 4, 5, 6, 8");
        }
        Some(QuantPlan { base: QuantSpec { bits: a.q_bits, group: a.q_group_size }, mixed, embed_bits: a.q_embed_bits })
    } else {
        None
    };
    let max_shard_bytes = crate::flag_values::parse_size(&a.max_shard_size, "--max-shard-size")?;
    Ok(ConvertOptions {
        dtype: a.dtype.as_deref().map(parse_dtype).transpose()?,
        quantize,
        dequantize: a.dequantize,
        max_shard_bytes,
        force: a.force,
    })
}

pub fn run(a: ConvertArgs) -> Result<()> {
    let opts = options(&a)?;
    mlx_dir::check_output(&a.out, opts.force)?;
    let mut from = PathBuf::from(&a.from);
    if !from.exists() {
        if !models::hub::looks_like_repo_id(&a.from) {
            bail!("--from: '{}' does not exist", a.from);
        }
        from = models::hub::resolve(&a.from, true).with_context(|| format!("--from {}", a.from))?;
    }
    let start = Instant::now();
    let source = if from.is_dir() {
        mlx_dir::source_from_dir(&from)
    } else {
        mlx_dir::source_from_gguf(&from)
    }
    .with_context(|| format!("--from {}", from.display()))?;

    let bar = ProgressBar::new(source.weights.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let report = mlx_dir::write(source, &a.out, &opts, &mut |item| {
        if item.ends_with(".safetensors") {
            bar.inc_length(1);
        }
        bar.set_message(item.to_string());
        bar.inc(1);
    })
    .with_context(|| format!("--out {}", a.out.display()))?;
    bar.finish_and_clear();
    println!(
        "wrote {}: {} tensors ({} quantized), {} shard(s), {:.1} MB of tensors in {:.2} s",
        a.out.display(),
        report.tensors,
        report.quantized,
        report.shards,
        report.bytes as f64 / 1e6,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
