//! KV recipes: a calibrated setting per layer (bits, groups, rotation) for one model at one byte
//! budget, as `kvsplit-mlx calibrate` writes them and `--kv-recipe` reads them.
//!
//! A preset such as `k8v4` names a byte budget (8-bit keys and 4-bit values at group 64: 13 bits
//! per K/V pair). Where the project ships a recipe for the loaded model at that budget, the
//! preset runs it; elsewhere the preset runs [`general_choice`]; `--kv-plain` runs the uniform
//! setting that other engines mean by the name.

use crate::error::{ModelError, Result};
use crate::generate::CacheSettings;
use mlx_kv::{KvSpec, LayerOverrides, Rotation};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Written as `format`; a JSON file without it is something else.
pub const FORMAT: &str = "kvsplit-mlx-kv-recipe";
pub const FORMAT_VERSION: u32 = 1;

/// The text a recipe was calibrated on and how it was cut.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    /// The text's name or path, as given to `calibrate`.
    pub text: String,
    /// SHA-256 of the text's bytes (hex), so an evaluation can prove it used other text.
    pub text_sha256: String,
    /// First token of the first window (windows are taken from here on, so that a text can be
    /// split into calibration and evaluation halves).
    pub start_token: usize,
    pub windows: usize,
    pub ctx: usize,
    pub chunk: usize,
}

/// What the recipe achieved on its calibration windows, against the unquantized cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Measured {
    /// KLD mean of the recipe, every layer at its chosen setting.
    pub kld_mean: f64,
    pub kld_se: f64,
    pub delta_ppl_pct: f64,
    pub delta_ppl_se_pct: f64,
    /// The sum of per-layer sensitivities the allocation minimised (its additive prediction).
    pub predicted_kld: f64,
    /// The plain preset on the same windows, for comparison (`None` for a budget in bits).
    pub plain_kld_mean: Option<f64>,
}

/// One calibrated recipe file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub format: String,
    pub version: u32,
    /// [`crate::load::ModelId::hash`] of the model it was calibrated for.
    pub model_id: String,
    pub model_name: String,
    /// The preset whose bytes it spends (`k8v4`), or `custom`.
    pub preset: String,
    /// The budget in stored bits per cached element (K and V averaged, scales counted).
    pub budget_bits: f64,
    /// What the chosen settings spend, in the same unit.
    pub bits_per_element: f64,
    /// One canonical setting per layer (`k8v4-g128,32-rotv`).
    pub layers: Vec<String>,
    pub calibration: Calibration,
    pub measured: Measured,
    /// How the settings were chosen, in words.
    pub method: String,
    pub command: String,
    pub created: String,
}

impl Recipe {
    /// Reads and checks a recipe file; every error names the file.
    pub fn load(path: &Path) -> Result<Recipe> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
        Self::parse(&text, path)
    }

    /// Parses recipe JSON read from `path` (used in messages).
    pub fn parse(text: &str, path: &Path) -> Result<Recipe> {
        let bad = |reason: String| ModelError::Config { path: path.to_path_buf(), reason };
        let recipe: Recipe = serde_json::from_str(text).map_err(|e| bad(format!("not a KV recipe: {e}")))?;
        if recipe.format != FORMAT {
            return Err(bad(format!("format is '{}', expected '{FORMAT}'", recipe.format)));
        }
        if recipe.version != FORMAT_VERSION {
            return Err(bad(format!("recipe version {} is not {FORMAT_VERSION}", recipe.version)));
        }
        recipe.specs().map_err(|e| bad(e.to_string()))?;
        Ok(recipe)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let io = |source| ModelError::Io { path: path.to_path_buf(), source };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let text = serde_json::to_string_pretty(self).expect("a recipe serializes");
        std::fs::write(path, text + "\n").map_err(io)
    }

    /// Every layer's setting.
    pub fn specs(&self) -> std::result::Result<Vec<KvSpec>, mlx_kv::KvError> {
        self.layers.iter().enumerate().map(|(i, t)| KvSpec::from_canonical(t, &format!("layer {i}"))).collect()
    }

    /// The recipe as per-layer overrides, after checking it was made for this model.
    pub fn overrides_for(&self, model_id: &str, n_layers: usize, origin: &Path) -> Result<LayerOverrides> {
        let bad = |reason: String| ModelError::Config { path: origin.to_path_buf(), reason };
        if self.model_id != model_id {
            return Err(bad(format!(
                "this recipe was calibrated for model {} ({}), not the loaded model {model_id}",
                self.model_id, self.model_name
            )));
        }
        if self.layers.len() != n_layers {
            return Err(bad(format!("{} layer settings for a model of {n_layers} layers", self.layers.len())));
        }
        Ok(LayerOverrides::per_layer(&self.specs().map_err(|e| bad(e.to_string()))?))
    }
}

/// Stored bits per element of one layer's setting, K and V averaged (float counts 16).
pub fn bits_per_element(spec: &KvSpec) -> f64 {
    (spec.k.bits_per_element() + spec.v.bits_per_element()) / 2.0
}

/// The recipes that ship with the project (crates/models/recipes, made by `calibrate`; the
/// command that made each is in the file), compiled in so that a bare binary finds them.
const SHIPPED: &[(&str, &str)] = &[
    ("SmolLM2-135M-Instruct.Q4_1-k8v4.json", include_str!("../recipes/SmolLM2-135M-Instruct.Q4_1-k8v4.json")),
    ("SmolLM2-135M-Instruct.Q4_1-k4v4.json", include_str!("../recipes/SmolLM2-135M-Instruct.Q4_1-k4v4.json")),
    ("SmolLM2-135M-Instruct.Q4_1-k4v2.json", include_str!("../recipes/SmolLM2-135M-Instruct.Q4_1-k4v2.json")),
    ("gemma-3-270m-q4_k_m-k8v4.json", include_str!("../recipes/gemma-3-270m-q4_k_m-k8v4.json")),
    ("gemma-3-270m-q4_k_m-k4v4.json", include_str!("../recipes/gemma-3-270m-q4_k_m-k4v4.json")),
    ("qwen2.5-coder-0.5b-instruct-q4_k_m-k8v4.json", include_str!("../recipes/qwen2.5-coder-0.5b-instruct-q4_k_m-k8v4.json")),
    ("qwen2.5-coder-0.5b-instruct-q4_k_m-k4v4.json", include_str!("../recipes/qwen2.5-coder-0.5b-instruct-q4_k_m-k4v4.json")),
    ("qwen2.5-coder-0.5b-instruct-q4_k_m-k4v2.json", include_str!("../recipes/qwen2.5-coder-0.5b-instruct-q4_k_m-k4v2.json")),
];

/// The shipped recipe for this model at `preset` (`k8v4`), if any, with the name it ships under.
pub fn shipped(model_id: &str, preset: &str) -> Option<(PathBuf, Recipe)> {
    SHIPPED.iter().find_map(|(name, text)| {
        let path = PathBuf::from(format!("<shipped>/{name}"));
        let r = Recipe::parse(text, &path).expect("shipped recipes parse (checked by a test)");
        (r.model_id == model_id && r.preset == preset).then_some((path, r))
    })
}

/// Every shipped recipe, for listing and tests.
pub fn all_shipped() -> Vec<(String, Recipe)> {
    SHIPPED.iter().map(|(name, text)| (name.to_string(), Recipe::parse(text, Path::new(name)).expect("shipped recipes parse"))).collect()
}

/// The documented best general choice for a preset on a model without a recipe: the same bits
/// with keys and values Hadamard-rotated. On every model and width measured (issue 18's
/// table: SmolLM2 and Gemma-3 at K8V4 and K4V4) rotation lowered KLD at no byte cost, and it
/// runs on both fast decode paths. Needs a power-of-two head_dim; elsewhere the plain spec.
pub fn general_choice(plain: &KvSpec, head_dim: usize) -> KvSpec {
    let mut spec = plain.clone();
    if plain.k.is_quantized() && plain.v.is_quantized() && head_dim.is_power_of_two() && plain.rotation == Rotation::None {
        spec.rotation = Rotation::KeysAndValues;
    }
    spec
}

/// How a preset is turned into the setting that runs.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Pick {
    /// The model's shipped recipe at the preset's bytes, else [`general_choice`].
    #[default]
    Auto,
    /// The uniform setting as given (`--kv-plain`), to compare with other engines.
    Plain,
    /// This recipe file (`--kv-recipe`), whatever `--kv` says.
    File(PathBuf),
}

/// The setting that runs and what every output line and result row calls it.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub settings: CacheSettings,
    /// The row name: the canonical spec, with `+recipe` for a recipe (`k8v4+recipe`).
    pub name: String,
    /// Which choice ran: `plain`, `custom` (flags beyond a preset), `general` or
    /// `recipe:<name>`.
    pub source: String,
}

impl Resolved {
    /// Settings that run as given, with no model to resolve against (`plain` for a bare
    /// preset, else `custom`).
    pub fn given(settings: CacheSettings) -> Resolved {
        let source = if is_preset(&settings) { "plain" } else { "custom" };
        Resolved { name: name_of(&settings), source: source.into(), settings }
    }
}

/// Whether `settings` is a bare preset: quantized K and V at default groups, nothing else set.
fn is_preset(settings: &CacheSettings) -> bool {
    let s = &settings.spec;
    settings.layers.is_empty() && s.k.is_quantized() && s.v.is_quantized() && *s == KvSpec::bits(s.k.bits, s.v.bits)
}

/// What resolving a setting needs to know of the model: its identity and shape, which the
/// config and file give before any weight loads.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelShape {
    /// [`crate::load::ModelId::hash`]; `none` for random weights.
    pub id: String,
    pub n_layers: usize,
    pub head_dim: usize,
}

impl ModelShape {
    pub fn of(engine: &crate::engine::Engine) -> ModelShape {
        ModelShape { id: engine.model_id(), n_layers: engine.model().n_layers(), head_dim: engine.model().head_dim() }
    }
}

/// Turns the settings a user gave into the one that runs on `model`.
pub fn resolve(settings: CacheSettings, pick: &Pick, model: &ModelShape) -> Result<Resolved> {
    let (n, model_id) = (model.n_layers, model.id.as_str());
    match pick {
        Pick::File(path) => {
            if !settings.layers.is_empty() {
                return Err(ModelError::Invalid { flag: "--kv-recipe", message: "a recipe sets every layer; drop --kv-layers".into() });
            }
            let recipe = Recipe::load(path)?;
            let layers = recipe.overrides_for(model_id, n, path)?;
            let stem = path.file_stem().map_or_else(|| path.display().to_string(), |s| s.to_string_lossy().into_owned());
            let mut base = KvSpec::parse(&recipe.preset).unwrap_or_else(|_| KvSpec::bits(8, 4));
            base.quantized_kv_start = 0;
            let settings = CacheSettings { spec: base, layers, max_kv_size: settings.max_kv_size };
            Ok(Resolved { name: windowed(format!("{}+recipe", recipe.preset), &settings), source: format!("recipe:{stem}"), settings })
        }
        Pick::Plain => Ok(Resolved { name: name_of(&settings), source: "plain".into(), settings }),
        Pick::Auto if !is_preset(&settings) => Ok(Resolved { name: name_of(&settings), source: "custom".into(), settings }),
        Pick::Auto => {
            let preset = settings.spec.to_string();
            // A recipe with settings this backend's fast path lacks, or whose step is still far
            // slower there (`preset_may_use`), would decode slower than the preset: the
            // general choice runs instead. (Both fast paths read the sink tokens that shipped
            // recipes keep on per-channel layers.)
            let fast = |r: &Recipe| r.specs().is_ok_and(|specs| specs.iter().all(|s| mlx_kv::attention::preset_may_use(s, model.head_dim)));
            if let Some((path, recipe)) = shipped(model_id, &preset).filter(|(_, r)| fast(r)) {
                let layers = recipe.overrides_for(model_id, n, &path)?;
                let stem = path.file_stem().map_or_else(String::new, |s| s.to_string_lossy().into_owned());
                let settings = CacheSettings { layers, ..settings };
                return Ok(Resolved { name: windowed(format!("{preset}+recipe"), &settings), source: format!("recipe:{stem}"), settings });
            }
            let spec = general_choice(&settings.spec, model.head_dim);
            let source = if spec == settings.spec { "plain" } else { "general" };
            let settings = CacheSettings { spec, ..settings };
            Ok(Resolved { name: name_of(&settings), source: source.into(), settings })
        }
    }
}

/// The row name of settings that are not a recipe.
fn name_of(settings: &CacheSettings) -> String {
    let mut name = settings.spec.to_string();
    if !settings.layers.is_empty() {
        name = format!("{name}-layers[{}]", settings.layers);
    }
    windowed(name, settings)
}

fn windowed(name: String, settings: &CacheSettings) -> String {
    match settings.max_kv_size {
        Some(w) => format!("{name}-win{w}"),
        None => name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_resolve_to_the_general_choice_and_flags_stay_as_given() {
        let m = ModelShape { id: "none".into(), n_layers: 2, head_dim: 64 };
        let preset = CacheSettings { spec: KvSpec::bits(8, 4), ..Default::default() };
        let r = resolve(preset.clone(), &Pick::Auto, &m).unwrap();
        assert_eq!((r.name.as_str(), r.source.as_str()), ("k8v4-rotkv", "general"));
        assert_eq!(r.settings.spec.rotation, Rotation::KeysAndValues);
        let r = resolve(preset.clone(), &Pick::Plain, &m).unwrap();
        assert_eq!((r.name.as_str(), r.source.as_str()), ("k8v4", "plain"));
        let mut custom = preset.clone();
        custom.spec.k.group = 32;
        let r = resolve(custom.clone(), &Pick::Auto, &m).unwrap();
        assert_eq!((r.settings.spec, r.source.as_str()), (custom.spec, "custom"));
        let dense = resolve(CacheSettings::default(), &Pick::Auto, &m).unwrap();
        assert_eq!((dense.name.as_str(), dense.source.as_str()), ("fp16", "custom"));
        let err = resolve(preset, &Pick::File("/nonexistent/r.json".into()), &m).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/r.json"), "{err}");
    }

    fn sample() -> Recipe {
        Recipe {
            format: FORMAT.into(),
            version: FORMAT_VERSION,
            model_id: "abc".into(),
            model_name: "m.gguf".into(),
            preset: "k8v4".into(),
            budget_bits: 6.5,
            bits_per_element: 6.5,
            layers: vec!["k8v4-g64,64-rotv".into(), "k4v8-g128,32".into()],
            calibration: Calibration { text: "t".into(), text_sha256: "00".into(), start_token: 0, windows: 1, ctx: 512, chunk: 128 },
            measured: Measured { kld_mean: 0.0, kld_se: 0.0, delta_ppl_pct: 0.0, delta_ppl_se_pct: 0.0, predicted_kld: 0.0, plain_kld_mean: None },
            method: "test".into(),
            command: "test".into(),
            created: "2026-12-05".into(),
        }
    }

    #[test]
    fn round_trips_and_checks_model_and_depth() {
        let dir = std::env::temp_dir().join(format!("kvsplit-recipe-{}", std::process::id()));
        let path = dir.join("r.json");
        let r = sample();
        r.save(&path).unwrap();
        let back = Recipe::load(&path).unwrap();
        assert_eq!(back, r);
        let o = back.overrides_for("abc", 2, &path).unwrap();
        assert_eq!(o.apply(&KvSpec::dense(), 1, 2).to_string(), "k4v8-g128,32");
        assert!(back.overrides_for("other", 2, &path).unwrap_err().to_string().contains("not the loaded model"));
        assert!(back.overrides_for("abc", 3, &path).unwrap_err().to_string().contains("2 layer settings"));
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn strict_loading_names_the_file_and_the_problem() {
        let p = Path::new("x.json");
        let mut v = serde_json::to_value(sample()).unwrap();
        v["extra"] = 1.into();
        let err = Recipe::parse(&v.to_string(), p).unwrap_err().to_string();
        assert!(err.starts_with("x.json") && err.contains("extra"), "{err}");
        let mut v = serde_json::to_value(sample()).unwrap();
        v["layers"][1] = "k7v4".into();
        assert!(Recipe::parse(&v.to_string(), p).unwrap_err().to_string().contains("layer 1"));
        let mut v = serde_json::to_value(sample()).unwrap();
        v.as_object_mut().unwrap().remove("model_id");
        assert!(Recipe::parse(&v.to_string(), p).unwrap_err().to_string().contains("model_id"));
    }

    #[test]
    fn shipped_recipes_parse_and_match_their_preset_bytes() {
        for (name, r) in all_shipped() {
            let specs = r.specs().unwrap();
            let bits = specs.iter().map(bits_per_element).sum::<f64>() / specs.len() as f64;
            assert!((bits - r.bits_per_element).abs() < 1e-9, "{name}: recorded {} vs {bits}", r.bits_per_element);
            let plain = KvSpec::parse(&r.preset).unwrap();
            let budget = bits_per_element(&plain);
            assert!((bits / budget - 1.0).abs() <= 0.03, "{name}: {bits} bits per element vs the preset's {budget}");
            // Sink tokens are a fixed cost per sequence, 16 bits each instead of the layer's
            // width; over the 512-token windows the targets are measured on, the recipe must
            // still spend the preset's bytes within 3%.
            let sinks = specs.iter().map(|s| s.sinks as f64 * (16.0 - bits_per_element(s)) / 512.0).sum::<f64>() / specs.len() as f64;
            assert!(((bits + sinks) / budget - 1.0).abs() <= 0.03, "{name}: {bits} + {sinks} sink bits per element vs the preset's {budget}");
            assert!(specs.iter().all(|s| s.sinks == 0 || s.key_layout == mlx_kv::KeyLayout::PerChannel), "{name}: sinks on a per-token layer");
        }
    }

    #[test]
    fn general_choice_rotates_quantized_power_of_two_heads_only() {
        assert_eq!(general_choice(&KvSpec::bits(8, 4), 64).rotation, Rotation::KeysAndValues);
        assert_eq!(general_choice(&KvSpec::bits(8, 4), 96).rotation, Rotation::None);
        assert!(general_choice(&KvSpec::dense(), 64).is_dense());
    }
}
