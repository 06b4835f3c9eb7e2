//! `--model`: where weights come from, and loading them.

use anyhow::{bail, Context, Result};
use clap::Args;
use mlx_rs::Dtype;
use models::generate::CacheSettings;
use std::path::PathBuf;

pub use models::assets::cache_dir;

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model: a `.gguf` file, a local MLX/HF directory, a Hub id (owner/name, fetched into the
    /// HF cache; honours HF_HOME, HF_ENDPOINT, HF_HUB_OFFLINE), or `default` (SmolLM2-135M-Instruct
    /// Q4_1, fetched by scripts/setup.sh).
    #[arg(long, default_value = "default")]
    pub model: String,
}


impl ModelArgs {
    pub fn path(&self) -> Result<PathBuf> {
        if self.model == "default" {
            return models::assets::default_model().context("--model default");
        }
        let p = PathBuf::from(&self.model);
        if !p.exists() && models::hub::looks_like_repo_id(&self.model) {
            return models::hub::resolve(&self.model, true).with_context(|| format!("--model {}", self.model));
        }
        if !p.exists() {
            bail!("--model: '{}' does not exist", self.model);
        }
        Ok(p)
    }
}

/// The dtype this backend computes in (f32 on CPU, f16 on GPU).
pub fn compute_dtype() -> Dtype {
    mlx_kv::Backend::current().compute_dtype()
}

/// Loads the model named by `--model` in the backend's compute dtype, after checking every K/V
/// setting (named by its `--kv` value) against the model's config, so a bad group size or layer
/// override fails before the weights are read.
pub fn load(args: &ModelArgs, settings: &[(&str, &CacheSettings)]) -> Result<(models::load::Loaded, PathBuf)> {
    let path = args.path()?;
    if !settings.is_empty() {
        let cfg = models::load::read_config(&path).with_context(|| format!("--model {}", path.display()))?;
        let (n, d) = (cfg.num_hidden_layers(), cfg.head_dim());
        for (kv, s) in settings {
            s.check(n, d).with_context(|| format!("--kv {kv} on {} ({n} layers, head_dim {d})", path.display()))?;
        }
    }
    let loaded = models::load::load(&path, compute_dtype()).with_context(|| format!("--model {}", path.display()))?;
    Ok((loaded, path))
}
