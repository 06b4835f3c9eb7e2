//! The one edge where K/V flags become `KvSpec`s and cache settings. `generate` takes one
//! setting ([`KvArgs`]); the sweeps (`ppl`, `bench`, `bench attention`, `compare`) take a
//! repeatable list ([`KvSweepArgs`]) with the same flags beside it. Every spec of every command
//! is built by [`KvArgs::spec_for`].

use anyhow::{bail, Context, Result};
use clap::{ArgAction, ArgMatches, Args, Command, FromArgMatches};
use mlx_kv::spec::parse_groups;
use mlx_kv::{KeyLayout, KvSpec, LayerOverrides, Rotation};
use models::engine::Engine;
use models::generate::CacheSettings;
use models::recipe::{self, ModelShape, Pick, Resolved};
use std::marker::PhantomData;
use std::path::PathBuf;

#[derive(Args, Debug, Clone)]
pub struct KvArgs {
    /// Key and value bits as `K,V` (e.g. `8,4`), one width for both, or a preset: fp16, k8v8,
    /// k8v4, k4v8, k4v4, k4v2. Bits: 2, 3, 4, 5, 6, 8, or 16 (no quantization).
    #[arg(long, default_value = "fp16")]
    pub kv: String,
    /// Quantization group size for keys and values (`64`) or separately (`64,32`): 32, 64 or 128.
    #[arg(long, default_value = "64")]
    pub kv_group_size: String,
    /// Key layout: `per-token` (groups along head_dim, like mlx-lm), `per-channel` (groups
    /// of the key group size along tokens, KIVI, the newest unfinished group in 16-bit float)
    /// or `centered` (per-token groups of keys less their per-channel mean, which leaves
    /// attention exact). Every layout runs on the fast decode paths (CPU primitive, fused CUDA
    /// kernel).
    #[arg(long, value_enum, default_value = "per-token")]
    pub kv_key_layout: KeyLayout,
    /// Newest tokens kept in full precision, quantized in blocks as they age (KIVI residual).
    #[arg(long, default_value_t = 0)]
    pub kv_residual: usize,
    /// First tokens kept in full precision for the whole run (attention sinks).
    #[arg(long, default_value_t = 0)]
    pub kv_sinks: usize,
    /// Hadamard rotation: `none`, `k` (keys) or `kv` (keys and values).
    #[arg(long, value_enum, default_value = "none")]
    pub kv_rotate: Rotation,
    /// Per-layer bit overrides, `;`-separated: `first:N=K,V`, `last:N=K,V`, `A-B=K,V`, `I=K,V`.
    #[arg(long, default_value = "")]
    pub kv_layers: String,
    /// Start quantizing once the cache holds this many tokens (mlx-lm's flag).
    #[arg(long, default_value_t = 0)]
    pub quantized_kv_start: usize,
    /// Keep at most this many tokens in the cache (a rotating window); works with quantization.
    #[arg(long)]
    pub max_kv_size: Option<usize>,
    /// A calibrated per-layer recipe (`kvsplit-mlx calibrate`) to run instead of --kv. Sweeps
    /// (ppl, bench, compare) take several, each one more setting beside the --kv list.
    #[arg(long)]
    pub kv_recipe: Vec<PathBuf>,
    /// Run a preset (k8v4, 8,4, ...) as the uniform setting its name says (every layer at those
    /// bits, group 64, no rotation), as other engines mean it. Without it a preset runs the
    /// model's shipped recipe at the same bytes, else the general choice (Hadamard-rotated keys
    /// and values); every row says which ran. In sweeps it applies to the --kv list, beside
    /// any --kv-recipe entries.
    #[arg(long)]
    pub kv_plain: bool,
}

impl KvArgs {
    /// The spec for one `--kv` value (sweeps pass each list element).
    pub fn spec_for(&self, kv: &str) -> Result<KvSpec> {
        let mut spec = KvSpec::parse(kv)?;
        let (gk, gv) = parse_groups(&self.kv_group_size)?;
        spec.k.group = gk;
        spec.v.group = gv;
        spec.key_layout = self.kv_key_layout;
        spec.residual = self.kv_residual;
        spec.sinks = self.kv_sinks;
        spec.rotation = self.kv_rotate;
        spec.quantized_kv_start = self.quantized_kv_start;
        Ok(spec)
    }

    pub fn settings_for(&self, kv: &str) -> Result<CacheSettings> {
        if self.max_kv_size == Some(0) {
            bail!("--max-kv-size: must be at least 1");
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

    /// How presets become settings (`--kv-plain` or the automatic choice).
    pub fn pick(&self) -> Pick {
        if self.kv_plain {
            Pick::Plain
        } else {
            Pick::Auto
        }
    }

    /// The one setting a single-setting command (generate, serve, cache-prompt) runs on the
    /// loaded model: the recipe file when given, else `--kv` resolved by [`Self::pick`].
    pub fn resolve(&self, engine: &Engine) -> Result<Resolved> {
        self.resolve_for(&self.single_pick()?, &ModelShape::of(engine))
    }

    /// The pick of a single-setting command: its one recipe file, else [`Self::pick`].
    pub fn single_pick(&self) -> Result<Pick> {
        Ok(match self.kv_recipe.as_slice() {
            [] => self.pick(),
            [_] if self.kv_plain => bail!("--kv-plain: this command runs one setting, and --kv-recipe gives it"),
            [one] => Pick::File(one.clone()),
            _ => bail!("--kv-recipe: this command runs one setting; give one recipe"),
        })
    }

    /// [`Self::resolve`] before the weights load (serve), from the model's file and config.
    pub fn resolve_for(&self, pick: &Pick, model: &ModelShape) -> Result<Resolved> {
        let what = match pick {
            Pick::File(f) => format!("--kv-recipe {}", f.display()),
            _ => format!("--kv {}", self.kv),
        };
        let r = recipe::resolve(self.settings()?, pick, model).with_context(|| what.clone())?;
        r.settings.check(model.n_layers, model.head_dim).with_context(|| what)?;
        Ok(r)
    }
}

/// What a sweep measures when `--kv` is not given.
pub trait SweepDefault {
    const KV: &'static str;
}

/// [`KvArgs`] with `--kv` repeatable and list-valued: `--kv fp16,k8v4` or `--kv fp16 --kv 8,4`
/// (`8,4` holds a comma but is one setting). `D` gives the command's default list.
#[derive(Debug, Clone)]
pub struct KvSweepArgs<D> {
    /// The settings, one element each, in the order given.
    pub list: Vec<String>,
    /// The other K/V flags, applied to every element.
    pub rest: KvArgs,
    default: PhantomData<D>,
}

const SWEEP_HELP: &str = "K/V settings to sweep: `K,V` (e.g. 8,4), one width, or a preset (fp16, k8v8, k8v4, k4v8, \
    k4v4, k4v2). Repeat the flag for several, or give presets as one comma list (fp16,k8v4,k4v4); `8,4` is one setting";

impl<D: SweepDefault> FromArgMatches for KvSweepArgs<D> {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        Self::from_arg_matches_mut(&mut m.clone())
    }
    fn from_arg_matches_mut(m: &mut ArgMatches) -> Result<Self, clap::Error> {
        // Every --kv, before the derived parser of KvArgs takes the first one.
        let raw: Vec<String> = m.get_many::<String>("kv").map(|v| v.cloned().collect()).unwrap_or_default();
        Ok(KvSweepArgs { list: expand_kv_list(&raw), rest: KvArgs::from_arg_matches_mut(m)?, default: PhantomData })
    }
    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl<D: SweepDefault> Args for KvSweepArgs<D> {
    fn augment_args(cmd: Command) -> Command {
        KvArgs::augment_args(cmd).mut_arg("kv", |a| a.action(ArgAction::Append).default_value(D::KV).help(SWEEP_HELP))
    }
    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

impl<D> KvSweepArgs<D> {
    /// Every setting of the list with the other flags applied, each error naming its value.
    pub fn specs(&self) -> Result<Vec<(String, KvSpec)>> {
        self.list.iter().map(|kv| Ok((kv.clone(), self.rest.spec_for(kv).map_err(|e| e.context(format!("--kv {kv}")))?))).collect()
    }

    /// The settings as given, before the model is known (to check them against its config
    /// before any weight loads).
    pub fn given(&self) -> Result<Vec<(String, CacheSettings)>> {
        self.list.iter().map(|kv| Ok((kv.clone(), self.rest.settings_for(kv).with_context(|| format!("--kv {kv}"))?))).collect()
    }

    /// Every setting the sweep runs on the loaded model: each --kv value resolved by
    /// `--kv-plain` or the automatic choice, then each --kv-recipe. Two entries that resolve to
    /// the same setting are one error, naming both.
    pub fn resolve(&self, engine: &Engine) -> Result<Vec<Resolved>> {
        let model = ModelShape::of(engine);
        let mut out: Vec<(String, Resolved)> = Vec::new();
        let given = self.given()?.into_iter().map(|(kv, s)| (kv, s, self.rest.pick()));
        let files = self.rest.kv_recipe.iter().map(|f| (format!("--kv-recipe {}", f.display()), self.rest.settings_for("fp16"), Pick::File(f.clone())));
        for (what, settings, pick) in given.map(|(kv, s, p)| (format!("--kv {kv}"), Ok(s), p)).chain(files) {
            let r = recipe::resolve(settings?, &pick, &model).with_context(|| what.clone())?;
            r.settings.check(model.n_layers, model.head_dim).with_context(|| what.clone())?;
            if let Some((other, _)) = out.iter().find(|(_, o)| o.name == r.name) {
                bail!("{what} repeats the setting {} of {other}", r.name);
            }
            out.push((what, r));
        }
        Ok(out.into_iter().map(|(_, r)| r).collect())
    }
}

fn is_preset(s: &str) -> bool {
    let s = s.trim().to_ascii_lowercase();
    matches!(s.as_str(), "fp16" | "f16" | "bf16") || (s.starts_with('k') && s.contains('v') && KvSpec::parse(&s).is_ok())
}

/// Splits `fp16,k8v4` into presets; `8,4` (not all presets) stays one value.
pub fn expand_kv_list(values: &[String]) -> Vec<String> {
    values
        .iter()
        .flat_map(|v| {
            let parts: Vec<&str> = v.split(',').map(str::trim).collect();
            if parts.len() > 1 && parts.iter().all(|p| is_preset(p)) {
                parts.into_iter().map(String::from).collect()
            } else {
                vec![v.trim().to_string()]
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    struct Two;
    impl SweepDefault for Two {
        const KV: &'static str = "fp16,k8v4";
    }

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        kv: KvSweepArgs<Two>,
    }

    #[test]
    fn kv_lists_split_only_when_every_element_is_a_preset() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(expand_kv_list(&v(&["fp16,k8v8,k4v2"])), v(&["fp16", "k8v8", "k4v2"]));
        assert_eq!(expand_kv_list(&v(&["8,4"])), v(&["8,4"]));
        assert_eq!(expand_kv_list(&v(&["8,4", "k4v4"])), v(&["8,4", "k4v4"]));
        assert_eq!(expand_kv_list(&v(&["k8v4,4"])), v(&["k8v4,4"]), "a non-preset element keeps the value whole");
    }

    #[test]
    fn lists_split_presets_but_keep_a_pair_whole() {
        let t = T::try_parse_from(["t", "--kv", "fp16,k8v4", "--kv", "8,4", "--kv-rotate", "kv"]).unwrap();
        assert_eq!(t.kv.list, vec!["fp16", "k8v4", "8,4"]);
        assert_eq!(t.kv.rest.kv_rotate, Rotation::KeysAndValues);
        let d = T::try_parse_from(["t"]).unwrap();
        assert_eq!(d.kv.list, vec!["fp16", "k8v4"]);
        let specs = d.kv.specs().unwrap();
        assert_eq!(specs[1].1.to_string(), "k8v4");
    }

    #[test]
    fn enum_flags_list_their_values_and_name_the_flag() {
        let e = T::try_parse_from(["t", "--kv-key-layout", "diagonal"]).err().unwrap().to_string();
        assert!(e.contains("--kv-key-layout") && e.contains("per-token") && e.contains("per-channel"), "{e}");
        let t = T::try_parse_from(["t", "--kv-key-layout", "per-channel", "--kv-rotate", "keys"]).unwrap();
        assert_eq!(t.kv.rest.kv_key_layout, KeyLayout::PerChannel);
        assert_eq!(t.kv.rest.kv_rotate, Rotation::Keys);
        let bad = T::try_parse_from(["t", "--kv", "9,4"]).unwrap().kv.specs().unwrap_err();
        assert!(format!("{bad:#}").contains("--kv 9,4"), "{bad:#}");
    }
}
