//! MLX / Hugging Face model directories: `config.json` plus `model.safetensors` or sharded
//! `model-0000X-of-0000Y.safetensors` with `model.safetensors.index.json`.
//!
//! mlx-community checkpoints store a quantized module as a triplet `P.weight` (packed `u32`),
//! `P.scales`, `P.biases`; its bits and group size come from the `quantization` block of
//! `config.json`, where a key equal to the module path `P` overrides the defaults for that module
//! (mlx-lm's mixed-precision recipes). Plain HF checkpoints hold bf16/f16/f32 tensors. Both
//! become a [`WeightMap`] under the same names, after mlx-lm's `sanitize` rules; the model's
//! strict key check then reports anything missing or left over.

use crate::families::ArchConfig;
use crate::error::{ModelError, Result};
use crate::weights::{Weight, WeightMap};
use mlx_ext::microscaled::MxFormat;
use mlx_rs::{Array, Dtype};
use safetensors::{Dtype as StDtype, SafeTensors};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

pub const CONFIG_FILE: &str = "config.json";
pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Bits and group size of one affine-quantized module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantSpec {
    pub bits: i32,
    pub group: i32,
}

/// The `quantization` block of an MLX `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantization {
    pub default: QuantSpec,
    /// The default's microscaled `mode`; `None`: affine.
    pub default_format: Option<MxFormat>,
    /// Per-module settings keyed by module path; `None` means the module is left unquantized.
    pub overrides: BTreeMap<String, Option<QuantSpec>>,
    /// The overrides whose `mode` is microscaled (mlx-community's gpt-oss: experts in `mxfp4`,
    /// the rest affine).
    pub formats: BTreeMap<String, MxFormat>,
}

impl Quantization {
    /// An affine block without overrides.
    pub fn affine(default: QuantSpec, overrides: BTreeMap<String, Option<QuantSpec>>) -> Self {
        Quantization { default, default_format: None, overrides, formats: BTreeMap::new() }
    }

    /// The setting for module `path` (a weight name without `.weight`).
    pub fn for_module(&self, path: &str) -> Option<QuantSpec> {
        match self.overrides.get(path) {
            Some(o) => *o,
            None => Some(self.default),
        }
    }

    /// The microscaled format of module `path`; `None` for affine (or unquantized) modules.
    pub fn format_for(&self, path: &str) -> Option<MxFormat> {
        match self.overrides.get(path) {
            Some(_) => self.formats.get(path).copied(),
            None => self.default_format,
        }
    }

    /// The block as mlx-lm writes it.
    pub fn to_json(&self) -> Value {
        let mut m = serde_json::Map::new();
        m.insert("group_size".into(), self.default.group.into());
        m.insert("bits".into(), self.default.bits.into());
        if let Some(f) = self.default_format {
            m.insert("mode".into(), f.mode().into());
        }
        for (k, o) in &self.overrides {
            let v = match (o, self.formats.get(k)) {
                (Some(q), Some(f)) => serde_json::json!({ "group_size": q.group, "bits": q.bits, "mode": f.mode() }),
                (Some(q), None) => serde_json::json!({ "group_size": q.group, "bits": q.bits }),
                (None, _) => Value::Bool(false),
            };
            m.insert(k.clone(), v);
        }
        Value::Object(m)
    }
}

fn cfg_err(path: &Path, reason: impl Into<String>) -> ModelError {
    ModelError::Config { path: path.to_path_buf(), reason: reason.into() }
}

/// mlx-lm's `mode`: `affine` (or absent) gives `None`, `mxfp4`/`mxfp8` their format, anything
/// else (`nvfp4`, which needs a global scale per tensor) is refused by name.
fn mode_from(v: &Value, path: &Path, key: &str) -> Result<Option<MxFormat>> {
    let Some(mode) = v.get("mode").and_then(Value::as_str).filter(|m| *m != "affine") else {
        return Ok(None);
    };
    MxFormat::from_mode(mode).map(Some).ok_or_else(|| ModelError::Unsupported {
        path: path.to_path_buf(),
        reason: format!("quantization '{key}': mode '{mode}' is not supported (affine, mxfp4 and mxfp8 are)"),
    })
}

/// Hugging Face's `quant_method`: only OpenAI's `mxfp4` (gpt-oss), which is mlx-lm's `mxfp4`
/// with group 32 and 4 bits; other methods (`bitnet`, `fp8`, `compressed-tensors`...) are refused
/// by name.
fn hf_method(v: &Value, path: &Path, key: &str) -> Result<Option<MxFormat>> {
    match v.get("quant_method").and_then(Value::as_str) {
        None => Ok(None),
        Some("mxfp4") => Ok(Some(MxFormat::Mxfp4)),
        Some(m) => Err(ModelError::Unsupported {
            path: path.to_path_buf(),
            reason: format!("quantization '{key}': quant_method '{m}' is not supported (mxfp4 is)"),
        }),
    }
}

fn spec_from(v: &Value, path: &Path, key: &str) -> Result<(QuantSpec, Option<MxFormat>)> {
    if let Some(f) = hf_method(v, path, key)? {
        return Ok((QuantSpec { bits: f.bits(), group: MxFormat::GROUP }, Some(f)));
    }
    let format = mode_from(v, path, key)?;
    let int = |name: &str| -> Result<i32> {
        v.get(name)
            .and_then(Value::as_i64)
            .map(|x| x as i32)
            .ok_or_else(|| cfg_err(path, format!("quantization '{key}': '{name}' is missing or not an integer")))
    };
    let spec = QuantSpec { bits: int("bits")?, group: int("group_size")? };
    if !(1..=8).contains(&spec.bits) || spec.group <= 0 {
        return Err(cfg_err(path, format!("quantization '{key}': bits {} / group_size {} are invalid", spec.bits, spec.group)));
    }
    if let Some(f) = format.filter(|f| spec.bits != f.bits() || spec.group != MxFormat::GROUP) {
        let (bits, group) = (f.bits(), MxFormat::GROUP);
        return Err(cfg_err(path, format!("quantization '{key}': mode '{}' takes bits {bits} and group_size {group}, got {} / {}", f.mode(), spec.bits, spec.group)));
    }
    Ok((spec, format))
}

/// Parses `quantization` (or HF's `quantization_config`), if present.
pub fn parse_quantization(cfg: &Value, path: &Path) -> Result<Option<Quantization>> {
    let Some((block, q)) = ["quantization", "quantization_config"].into_iter().find_map(|k| cfg.get(k).map(|q| (k, q))) else {
        return Ok(None);
    };
    let (default, default_format) = spec_from(q, path, block)?;
    let (mut overrides, mut formats) = (BTreeMap::new(), BTreeMap::new());
    if let Some(obj) = q.as_object() {
        for (k, v) in obj {
            match v {
                Value::Object(_) => {
                    let (spec, format) = spec_from(v, path, k)?;
                    overrides.insert(k.clone(), Some(spec));
                    if let Some(f) = format {
                        formats.insert(k.clone(), f);
                    }
                }
                Value::Bool(false) => {
                    overrides.insert(k.clone(), None);
                }
                // Scalars are the defaults (and mlx-lm's `mode`), not module overrides.
                _ => {}
            }
        }
    }
    Ok(Some(Quantization { default, default_format, overrides, formats }))
}

/// A directory's `config.json`: the family config, the quantization block and the JSON itself.
#[derive(Debug, Clone)]
pub struct DirConfig {
    pub config: ArchConfig,
    pub quant: Option<Quantization>,
    pub raw: Value,
}

/// Reads and parses `config.json`; an unsupported `model_type` is an error naming it.
pub fn read_dir_config(dir: &Path) -> Result<DirConfig> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io { path: path.clone(), source })?;
    let raw: Value = serde_json::from_str(&text).map_err(|e| cfg_err(&path, format!("invalid JSON: {e}")))?;
    let config = ArchConfig::from_json(&raw).map_err(|reason| ModelError::Unsupported { path: path.clone(), reason })?;
    let quant = parse_quantization(&raw, &path)?;
    Ok(DirConfig { config, quant, raw })
}

/// Reads `config.json`: the model config and its quantization block.
pub fn read_config(dir: &Path) -> Result<(ArchConfig, Option<Quantization>)> {
    let c = read_dir_config(dir)?;
    Ok((c.config, c.quant))
}

/// The safetensors files of a directory with, for sharded checkpoints, the tensor names the
/// index promises each one holds.
pub fn shard_files(dir: &Path) -> Result<Vec<(PathBuf, BTreeSet<String>)>> {
    let index = dir.join(INDEX_FILE);
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|source| ModelError::Io { path: index.clone(), source })?;
        let v: Value = serde_json::from_str(&text).map_err(|e| cfg_err(&index, format!("invalid JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| cfg_err(&index, "no 'weight_map' object"))?;
        let mut files: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (tensor, file) in map {
            let file = file.as_str().ok_or_else(|| cfg_err(&index, format!("weight_map['{tensor}'] is not a file name")))?;
            if file.contains('/') || file.contains("..") {
                return Err(cfg_err(&index, format!("weight_map['{tensor}'] = '{file}' leaves the model directory")));
            }
            files.entry(file.to_string()).or_default().insert(tensor.clone());
        }
        return Ok(files.into_iter().map(|(f, names)| (dir.join(f), names)).collect());
    }
    let single = dir.join(SINGLE_FILE);
    if single.exists() {
        return Ok(vec![(single, BTreeSet::new())]);
    }
    Err(cfg_err(dir, format!("neither {SINGLE_FILE} nor {INDEX_FILE} found")))
}

fn mlx_dtype(d: StDtype) -> Option<Dtype> {
    Some(match d {
        StDtype::BOOL => Dtype::Bool,
        StDtype::U8 => Dtype::Uint8,
        StDtype::I8 => Dtype::Int8,
        StDtype::U16 => Dtype::Uint16,
        StDtype::I16 => Dtype::Int16,
        StDtype::U32 => Dtype::Uint32,
        StDtype::I32 => Dtype::Int32,
        StDtype::U64 => Dtype::Uint64,
        StDtype::I64 => Dtype::Int64,
        StDtype::F16 => Dtype::Float16,
        StDtype::BF16 => Dtype::Bfloat16,
        StDtype::F32 => Dtype::Float32,
        _ => return None,
    })
}

/// Every tensor of one safetensors file, as stored (no dtype conversion).
pub fn read_safetensors(path: &Path) -> Result<Vec<(String, Array)>> {
    let file = std::fs::File::open(path).map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
    // SAFETY: the map is read-only and dropped before returning; every tensor is copied out.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
    let st = SafeTensors::deserialize(&mmap).map_err(|e| cfg_err(path, format!("not a valid safetensors file: {e}")))?;
    let mut out = Vec::with_capacity(st.len());
    for (name, view) in st.tensors() {
        let dtype = mlx_dtype(view.dtype())
            .ok_or_else(|| cfg_err(path, format!("tensor '{name}': dtype {:?} is not supported", view.dtype())))?;
        let shape: Vec<i32> = view
            .shape()
            .iter()
            .map(|&d| i32::try_from(d))
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| cfg_err(path, format!("tensor '{name}': shape {:?} is too large", view.shape())))?;
        // SAFETY: `deserialize` checked that the data holds exactly shape x dtype bytes, and
        // MLX copies the buffer (alignment does not matter for a byte copy).
        let a = unsafe { Array::from_raw_data(view.data().as_ptr().cast(), &shape, dtype) };
        out.push((name, a));
    }
    Ok(out)
}

/// mlx-lm's `sanitize`: drops RoPE tables some checkpoints carry and a tied output head.
fn sanitize(tensors: &mut BTreeMap<String, Array>, cfg: &ArchConfig) {
    tensors.retain(|k, _| !k.ends_with("rotary_emb.inv_freq"));
    if cfg.drops_stored_head() {
        for suffix in ["weight", "scales", "biases"] {
            tensors.remove(&format!("lm_head.{suffix}"));
        }
    }
}

/// Combines triplets into quantized weights and casts float tensors to `dtype` (`None` keeps
/// the stored dtype).
fn build_map(
    dir: &Path,
    mut tensors: BTreeMap<String, Array>,
    quant: Option<&Quantization>,
    dtype: Option<Dtype>,
) -> Result<WeightMap> {
    let cast = |a: Array| -> Result<Array> {
        Ok(match dtype {
            Some(d) => a.as_dtype(d)?,
            None => a,
        })
    };
    let mut map = WeightMap::new(dir.to_path_buf());
    let modules: Vec<String> = tensors
        .keys()
        .filter_map(|k| k.strip_suffix(".scales"))
        .filter(|m| tensors.contains_key(&format!("{m}.weight")))
        .map(String::from)
        .collect();
    for m in modules {
        let (wk, sk, bk) = (format!("{m}.weight"), format!("{m}.scales"), format!("{m}.biases"));
        if let Some(format) = quant.and_then(|q| q.format_for(&m)) {
            let (w, scales) = (tensors.remove(&wk).expect("filtered above"), tensors.remove(&sk).expect("key from map"));
            map.insert(wk.clone(), microscaled_weight(dir, &wk, w, scales, tensors.contains_key(&bk), format)?);
            continue;
        }
        let Some(biases) = tensors.remove(&bk) else {
            return Err(cfg_err(dir, format!("tensor '{sk}' has no '{bk}': only affine quantization is supported")));
        };
        let (w, scales) = (tensors.remove(&wk).expect("filtered above"), tensors.remove(&sk).expect("key from map"));
        let spec = quant
            .ok_or_else(|| cfg_err(dir, format!("'{wk}' is quantized but config.json has no 'quantization' block")))?
            .for_module(&m)
            .ok_or_else(|| cfg_err(dir, format!("'{wk}' is quantized but config.json marks '{m}' unquantized")))?;
        let (ws, ss) = (w.shape().to_vec(), scales.shape().to_vec());
        let consistent = w.dtype() == Dtype::Uint32
            && ws.len() == ss.len()
            && ws[..ws.len() - 1] == ss[..ss.len() - 1]
            && biases.shape() == scales.shape()
            && ws[ws.len() - 1] as i64 * 32 == ss[ss.len() - 1] as i64 * spec.group as i64 * spec.bits as i64;
        if !consistent {
            return Err(cfg_err(
                dir,
                format!(
                    "'{wk}' ({:?} {ws:?}) with scales {ss:?} does not match {} bits, group {}",
                    w.dtype(),
                    spec.bits,
                    spec.group
                ),
            ));
        }
        let weight = Weight::Quant {
            w,
            scales: cast(scales)?,
            biases: cast(biases)?,
            bits: spec.bits,
            group: spec.group,
        };
        map.insert(wk, weight);
    }
    for (k, a) in tensors {
        let is_float = matches!(a.dtype(), Dtype::Float16 | Dtype::Bfloat16 | Dtype::Float32);
        map.insert(k, Weight::Dense(if is_float { cast(a)? } else { a }));
    }
    Ok(map)
}

/// A module in a microscaled mode: u32 codes, one u8 (e8m0) scale per 32 elements, no biases.
fn microscaled_weight(dir: &Path, wk: &str, w: Array, scales: Array, has_biases: bool, format: MxFormat) -> Result<Weight> {
    let (ws, ss) = (w.shape().to_vec(), scales.shape().to_vec());
    let consistent = !has_biases
        && w.dtype() == Dtype::Uint32
        && scales.dtype() == Dtype::Uint8
        && ws.len() == ss.len()
        && ws[..ws.len() - 1] == ss[..ss.len() - 1]
        && ws[ws.len() - 1] as i64 * 32 == ss[ss.len() - 1] as i64 * MxFormat::GROUP as i64 * format.bits() as i64;
    if !consistent {
        return Err(cfg_err(
            dir,
            format!(
                "'{wk}' ({:?} {ws:?}) with {:?} scales {ss:?}{} does not match mode '{}' (u32 codes, u8 scales per 32 elements, no biases)",
                w.dtype(),
                scales.dtype(),
                if has_biases { " and biases" } else { "" },
                format.mode()
            ),
        ));
    }
    Ok(Weight::Mx { w, scales, format })
}

/// Reads every tensor of the directory's checkpoint, checking the index against the files.
pub fn read_tensors(dir: &Path) -> Result<BTreeMap<String, Array>> {
    let mut tensors = BTreeMap::new();
    let mut origin: HashMap<String, PathBuf> = HashMap::new();
    for (file, promised) in shard_files(dir)? {
        let got = read_safetensors(&file)?;
        let names: BTreeSet<String> = got.iter().map(|(n, _)| n.clone()).collect();
        if let Some(missing) = promised.difference(&names).next() {
            return Err(cfg_err(&file, format!("tensor '{missing}' listed in {INDEX_FILE} is not in this file")));
        }
        for (name, a) in got {
            if let Some(first) = origin.insert(name.clone(), file.clone()) {
                return Err(cfg_err(&file, format!("tensor '{name}' also appears in {}", first.display())));
            }
            tensors.insert(name, a);
        }
    }
    Ok(tensors)
}

/// Opens an MLX/HF model directory: config plus every tensor under its checkpoint name, with
/// float tensors (and quantization scales/biases) in `dtype`.
pub fn load_dir(dir: &Path, dtype: Dtype) -> Result<(ArchConfig, WeightMap)> {
    let d = load_dir_as(dir, Some(dtype))?;
    Ok((d.config, d.weights))
}

/// An opened model directory.
pub struct LoadedDir {
    pub config: ArchConfig,
    pub quant: Option<Quantization>,
    /// `config.json` as read (for fields no family config keeps, e.g. `eos_token_id`).
    pub raw: Value,
    pub weights: WeightMap,
}

/// Like [`load_dir`], with float tensors in their stored dtype when `dtype` is `None` (for
/// conversion), and the quantization block.
pub fn load_dir_as(dir: &Path, dtype: Option<Dtype>) -> Result<LoadedDir> {
    let DirConfig { config, quant, raw } = read_dir_config(dir)?;
    let mut tensors = read_tensors(dir)?;
    sanitize(&mut tensors, &config);
    let weights = build_map(dir, tensors, quant.as_ref(), dtype)?;
    Ok(LoadedDir { config, quant, raw, weights })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_module_overrides_win_over_defaults() {
        let v: Value = serde_json::json!({"quantization": {
            "group_size": 64, "bits": 4,
            "model.layers.0.mlp.down_proj": {"group_size": 32, "bits": 8},
            "lm_head": false
        }});
        let q = parse_quantization(&v, Path::new("config.json")).unwrap().unwrap();
        assert_eq!(q.for_module("model.layers.1.mlp.down_proj"), Some(QuantSpec { bits: 4, group: 64 }));
        assert_eq!(q.for_module("model.layers.0.mlp.down_proj"), Some(QuantSpec { bits: 8, group: 32 }));
        assert_eq!(q.for_module("lm_head"), None);
        let back = parse_quantization(&serde_json::json!({ "quantization": q.to_json() }), Path::new("c")).unwrap();
        assert_eq!(back, Some(q));
    }

    #[test]
    fn microscaled_modes_parse_per_module_and_others_are_refused_by_name() {
        // mlx-community's gpt-oss: affine 8-bit default, experts in mxfp4.
        let experts = "model.layers.0.mlp.experts.gate_proj";
        let v: Value = serde_json::json!({"quantization": {"group_size": 64, "bits": 8, "mode": "affine",
            experts: {"group_size": 32, "bits": 4, "mode": "mxfp4"}, "m.x": {"group_size": 64, "bits": 4}}});
        let q = parse_quantization(&v, Path::new("config.json")).unwrap().unwrap();
        assert_eq!(q.format_for(experts), Some(MxFormat::Mxfp4));
        assert_eq!(q.for_module(experts), Some(QuantSpec { bits: 4, group: 32 }));
        assert_eq!((q.format_for("m.x"), q.format_for("other")), (None, None));
        let back = parse_quantization(&serde_json::json!({ "quantization": q.to_json() }), Path::new("c")).unwrap();
        assert_eq!(back, Some(q));
        // A whole-model mode, and OpenAI's Hugging Face block.
        let v: Value = serde_json::json!({"quantization": {"group_size": 32, "bits": 8, "mode": "mxfp8", "m.x": {"group_size": 64, "bits": 4}}});
        let q = parse_quantization(&v, Path::new("config.json")).unwrap().unwrap();
        assert_eq!((q.format_for("a.b"), q.format_for("m.x")), (Some(MxFormat::Mxfp8), None));
        let v: Value = serde_json::json!({"quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": []}});
        let q = parse_quantization(&v, Path::new("config.json")).unwrap().unwrap();
        assert_eq!((q.default, q.default_format), (QuantSpec { bits: 4, group: 32 }, Some(MxFormat::Mxfp4)));
        // Refused by name: a mode we do not run, a method we do not run, a mode's wrong widths.
        let v: Value = serde_json::json!({"quantization": {"group_size": 16, "bits": 4, "mode": "nvfp4"}});
        let e = parse_quantization(&v, Path::new("config.json")).unwrap_err().to_string();
        assert!(e.contains("quantization 'quantization': mode 'nvfp4' is not supported"), "{e}");
        let v: Value = serde_json::json!({"quantization_config": {"quant_method": "bitnet"}});
        let e = parse_quantization(&v, Path::new("config.json")).unwrap_err().to_string();
        assert!(e.contains("quantization 'quantization_config': quant_method 'bitnet' is not supported"), "{e}");
        let v: Value = serde_json::json!({"quantization": {"group_size": 64, "bits": 4, experts: {"group_size": 64, "bits": 4, "mode": "mxfp4"}}});
        let e = parse_quantization(&v, Path::new("config.json")).unwrap_err().to_string();
        assert!(e.contains(experts) && e.contains("mode 'mxfp4' takes bits 4 and group_size 32, got 4 / 64"), "{e}");
    }

    #[test]
    fn invalid_bits_name_the_module() {
        let v: Value = serde_json::json!({"quantization": {"group_size": 64, "bits": 4, "m.x": {"group_size": 64, "bits": 12}}});
        let e = parse_quantization(&v, Path::new("config.json")).unwrap_err().to_string();
        assert!(e.contains("m.x") && e.contains("12"), "{e}");
    }
}
