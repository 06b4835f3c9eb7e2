//! The KV-cache flags shared by `generate`, `ppl` and `bench`.

use anyhow::Result;
use clap::Args;
use mlx_kv::spec::parse_groups;
use mlx_kv::{KeyLayout, KvSpec, LayerOverrides, Rotation};
use models::generate::CacheSettings;

#[derive(Args, Debug, Clone)]
pub struct KvArgs {
    /// Key and value bits as `K,V` (e.g. `8,4`), one width for both, or a preset: fp16, k8v8,
    /// k8v4, k4v8, k4v4, k4v2. Bits: 2, 3, 4, 5, 6, 8, or 16 (no quantization).
    #[arg(long, default_value = "fp16")]
    pub kv: String,
    /// Quantization group size for keys and values (`64`) or separately (`64,32`): 32, 64 or 128.
    #[arg(long, default_value = "64")]
    pub kv_group_size: String,
    /// Key layout: `per-token` (groups along head_dim, like mlx-lm) or `per-channel` (groups
    /// along tokens, KIVI).
    #[arg(long, default_value = "per-token")]
    pub kv_key_layout: String,
    /// Newest tokens kept in full precision, quantized in blocks as they age (KIVI residual).
    #[arg(long, default_value_t = 0)]
    pub kv_residual: usize,
    /// First tokens kept in full precision for the whole run (attention sinks).
    #[arg(long, default_value_t = 0)]
    pub kv_sinks: usize,
    /// Hadamard rotation: `none`, `k` (keys) or `kv` (keys and values).
    #[arg(long, default_value = "none")]
    pub kv_rotate: String,
    /// Per-layer bit overrides, `;`-separated: `first:N=K,V`, `last:N=K,V`, `A-B=K,V`, `I=K,V`.
    #[arg(long, default_value = "")]
    pub kv_layers: String,
    /// Start quantizing once the cache holds this many tokens (mlx-lm's flag).
    #[arg(long, default_value_t = 0)]
    pub quantized_kv_start: usize,
    /// Keep at most this many tokens in the cache (a rotating window); works with quantization.
    #[arg(long)]
    pub max_kv_size: Option<usize>,
}

impl KvArgs {
    /// The spec for one `--kv` value (sweeps pass each list element).
    pub fn spec_for(&self, kv: &str) -> Result<KvSpec> {
        let mut spec = KvSpec::parse(kv)?;
        let (gk, gv) = parse_groups(&self.kv_group_size)?;
        spec.k.group = gk;
        spec.v.group = gv;
        spec.key_layout = self.kv_key_layout.parse::<KeyLayout>()?;
        spec.residual = self.kv_residual;
        spec.sinks = self.kv_sinks;
        spec.rotation = self.kv_rotate.parse::<Rotation>()?;
        spec.quantized_kv_start = self.quantized_kv_start;
        Ok(spec)
    }

    pub fn settings_for(&self, kv: &str) -> Result<CacheSettings> {
        if self.max_kv_size == Some(0) {
            anyhow::bail!("--max-kv-size: must be at least 1");
        }
        Ok(CacheSettings {
            spec: self.spec_for(kv)?,
            layers: LayerOverrides::parse(&self.kv_layers)?,
            max_kv_size: self.max_kv_size,
        })
    }

    pub fn settings(&self) -> Result<CacheSettings> {
        self.settings_for(&self.kv)
    }
}
