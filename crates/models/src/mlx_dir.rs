//! Writing MLX model directories (the mlx-community layout): `config.json` with a
//! `quantization` block, `model.safetensors` (sharded with an index above a size limit), and the
//! tokenizer files, from a GGUF file or an HF/MLX directory.
//!
//! GGUF Q4_0/Q4_1/Q8_0 tensors already are MLX affine triplets (group 32), so they are carried
//! over bit for bit unless another quantization is asked for; their scales and biases are stored
//! as f16 when that is exact (it is for every real file: they are f16 in GGUF, and Q4_0/Q8_0
//! biases are those times a power of two) and as f32 otherwise.

use crate::error::{ModelError, Result};
use crate::gguf::GgmlType;
use crate::load::safetensors::{load_dir_as, QuantSpec, Quantization, CONFIG_FILE, INDEX_FILE, SINGLE_FILE};
use crate::weights::Weight;
use mlx_rs::ops::{dequantize, quantize};
use mlx_ext::microscaled::{self, MxFormat};
use mlx_ext::tensor_bytes::{BytesError, TensorBytes};
use mlx_rs::{Array, Dtype};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Tokenizer and generation files copied from an HF directory when present.
const TOKENIZER_FILES: &[&str] =
    &["tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json", "chat_template.jinja"];

/// What to convert: config, tensors (HF names, stored dtypes) and the small text files.
pub struct Source {
    pub config: Value,
    pub weights: Vec<(String, Weight)>,
    pub files: Vec<(String, String)>,
}

/// mlx-lm's mixed-precision recipes (`--quant-predicate mixed_L_H`, after llama.cpp's Q4_K_M
/// choices): `high` bits for `lm_head` and for the value and down projections of the first and
/// last eighth of the layers and of every third layer between them, `low` bits elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MixedRecipe {
    pub low: i32,
    pub high: i32,
}

impl MixedRecipe {
    /// The recipe names mlx-lm accepts.
    pub const NAMES: &'static [&'static str] = &["mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6"];

    pub fn parse(name: &str) -> Option<Self> {
        let (low, high) = match name {
            "mixed_2_6" => (2, 6),
            "mixed_3_4" => (3, 4),
            "mixed_3_6" => (3, 6),
            "mixed_4_6" => (4, 6),
            _ => return None,
        };
        Some(MixedRecipe { low, high })
    }

    /// Bits for `module` in a model of `n_layers` layers.
    fn bits(&self, module: &str, n_layers: usize) -> i32 {
        let parts: Vec<&str> = module.split('.').collect();
        // The layer index follows "layers"; modules outside the stack count as layer 0.
        let index = parts
            .iter()
            .position(|p| *p == "layers")
            .and_then(|i| parts.get(i + 1))
            .and_then(|p| p.parse::<i64>().ok())
            .unwrap_or(0);
        let (n, eighth) = (n_layers as i64, n_layers as i64 / 8);
        let more = index < eighth || index >= 7 * n / 8 || (index - eighth).rem_euclid(3) == 2;
        // Substring tests as in mlx-lm, so Phi-3's fused `qkv_proj` counts as a value projection.
        if (more && (module.contains("v_proj") || module.contains("down_proj"))) || module.contains("lm_head") {
            self.high
        } else {
            self.low
        }
    }
}

/// What `-q` asks for: one setting, optionally varied per module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantPlan {
    /// Bits (unless a recipe decides) and group size of every quantized module.
    pub base: QuantSpec,
    /// A mixed-precision recipe; its bits replace `base.bits`.
    pub mixed: Option<MixedRecipe>,
    /// Bits for the embedding and the output head, which are the most sensitive to rounding.
    pub embed_bits: Option<i32>,
}

impl QuantPlan {
    /// Every module at `spec`.
    pub fn uniform(spec: QuantSpec) -> Self {
        QuantPlan { base: spec, mixed: None, embed_bits: None }
    }

    /// The setting of `module` (a weight name without `.weight`) in a model of `n_layers`.
    pub fn spec_for(&self, module: &str, n_layers: usize) -> QuantSpec {
        let mut bits = self.mixed.map_or(self.base.bits, |m| m.bits(module, n_layers));
        if let Some(b) = self.embed_bits {
            if module.ends_with("embed_tokens") || module.ends_with("lm_head") {
                bits = b;
            }
        }
        QuantSpec { bits, group: self.base.group }
    }
}

/// How to write the output.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Dtype of dense float tensors; `None` keeps each tensor's source precision.
    pub dtype: Option<Dtype>,
    /// Quantize every matrix (and stack of matrices) as planned (re-quantizing quantized ones
    /// that differ).
    pub quantize: Option<QuantPlan>,
    /// Write every weight dense.
    pub dequantize: bool,
    /// Shard when the tensors exceed this many bytes.
    pub max_shard_bytes: u64,
    /// Replace an existing output.
    pub force: bool,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct Report {
    pub tensors: usize,
    pub quantized: usize,
    pub shards: usize,
    pub bytes: u64,
}

fn cfg_err(path: &Path, reason: impl Into<String>) -> ModelError {
    ModelError::Config { path: path.to_path_buf(), reason: reason.into() }
}

/// A GGUF file as a conversion source: HF names, Q/K rows in HF order, F16/BF16 tensors in
/// their own dtype, everything else dequantized to f32 (exact) or kept as a triplet.
pub fn source_from_gguf(path: &Path) -> Result<Source> {
    let (cfg, mut map, gguf) = crate::load::gguf::load_any_lossless(path, Dtype::Float32)?;
    let native: HashMap<String, Dtype> = gguf
        .tensors()
        .iter()
        .filter_map(|t| {
            let d = match t.ggml_type {
                GgmlType::F16 => Dtype::Float16,
                GgmlType::BF16 => Dtype::Bfloat16,
                _ => return None,
            };
            Some((cfg.gguf_tensor_name(&t.name).unwrap_or_else(|| t.name.clone()), d))
        })
        .collect();
    let names: Vec<String> = map.names().cloned().collect();
    let mut weights = Vec::with_capacity(names.len());
    for name in names {
        let w = match (map.take(&name)?, native.get(&name)) {
            (Weight::Dense(a), Some(&d)) => Weight::Dense(a.as_dtype(d)?),
            (w, _) => w,
        };
        weights.push((name, w));
    }
    let config = cfg.to_json();
    let files = crate::tokenizer_json::files_from_gguf(&gguf)
        .map_err(|e| cfg_err(path, format!("tokenizer: {e}")))?;
    Ok(Source { config, weights, files })
}

/// An HF or MLX directory as a conversion source (tensors in their stored dtypes).
pub fn source_from_dir(dir: &Path) -> Result<Source> {
    let mut map = load_dir_as(dir, None)?.weights;
    let cfg_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&cfg_path).map_err(|source| ModelError::Io { path: cfg_path.clone(), source })?;
    let mut config: Value = serde_json::from_str(&text).map_err(|e| cfg_err(&cfg_path, e.to_string()))?;
    if let Some(obj) = config.as_object_mut() {
        obj.remove("quantization");
        obj.remove("quantization_config");
    }
    let names: Vec<String> = map.names().cloned().collect();
    let weights = names.into_iter().map(|n| map.take(&n).map(|w| (n, w))).collect::<Result<_>>()?;
    let mut files = Vec::new();
    for f in TOKENIZER_FILES {
        let p = dir.join(f);
        if p.exists() {
            files.push((f.to_string(), std::fs::read_to_string(&p).map_err(|source| ModelError::Io { path: p, source })?));
        }
    }
    Ok(Source { config, weights, files })
}

/// Stores `a` as f16 when that round-trips exactly, else as f32.
fn exact_half(a: &Array) -> Result<Array> {
    let a32 = a.as_dtype(Dtype::Float32)?;
    let h = a32.as_dtype(Dtype::Float16)?;
    let same = h.as_dtype(Dtype::Float32)?.eq_values(&a32)?;
    Ok(if same { h } else { a32 })
}

/// Output tensors of one source weight, with its quantization if it has one.
/// Output tensors of one source weight, with its quantization if it has one (and its
/// microscaled mode when it is not affine).
type Converted = (Vec<(String, Array)>, Option<(QuantSpec, Option<MxFormat>)>);

fn convert_weight(name: &str, w: Weight, opts: &ConvertOptions, n_layers: usize) -> Result<Converted> {
    let module = name.strip_suffix(".weight");
    let target = opts.quantize.map(|plan| plan.spec_for(module.unwrap_or(name), n_layers));
    // Matrices, and stacks of them (MoE experts `[experts, out, in]`, which mlx-lm quantizes
    // along the last axis as well).
    let quantizable = |shape: &[usize], spec: QuantSpec| {
        module.is_some() && shape.len() >= 2 && shape[shape.len() - 1].is_multiple_of(spec.group as usize)
    };
    let dense_out = |a: Array| -> Result<Array> {
        Ok(match opts.dtype {
            Some(d) if matches!(a.dtype(), Dtype::Float16 | Dtype::Bfloat16 | Dtype::Float32) => a.as_dtype(d)?,
            _ => a,
        })
    };
    let triplet = |m: &str, w: Array, s: Array, b: Array, spec: QuantSpec| {
        (vec![(format!("{m}.weight"), w), (format!("{m}.scales"), s), (format!("{m}.biases"), b)], Some((spec, None)))
    };
    let shape = w.shape();
    match w {
        Weight::Quant { w, scales, biases, bits, group } => {
            let spec = QuantSpec { bits, group };
            let keep = !opts.dequantize && target.is_none_or(|q| q == spec);
            if keep {
                let m = module.ok_or_else(|| cfg_err(Path::new(name), "quantized tensor not named *.weight"))?;
                return Ok(triplet(m, w, exact_half(&scales)?, exact_half(&biases)?, spec));
            }
            let dense = dequantize(&w, &scales, &biases, group, bits)?;
            let dense = match opts.dtype {
                Some(d) => dense.as_dtype(d)?,
                None => dense.as_dtype(scales.dtype())?,
            };
            convert_weight(name, Weight::Dense(dense), opts, n_layers)
        }
        // Microscaled codes are kept as they are unless the output is dense or a plan
        // re-quantizes (then they leave as floats: e2m1/e4m3 times a power of two fit bf16).
        Weight::Mx { w, scales, format } => {
            if !opts.dequantize && target.is_none() {
                let m = module.ok_or_else(|| cfg_err(Path::new(name), "quantized tensor not named *.weight"))?;
                let spec = QuantSpec { bits: format.bits(), group: MxFormat::GROUP };
                return Ok((vec![(format!("{m}.weight"), w), (format!("{m}.scales"), scales)], Some((spec, Some(format)))));
            }
            let dense = microscaled::dequantize(&w, &scales, format)?.as_dtype(opts.dtype.unwrap_or(Dtype::Bfloat16))?;
            convert_weight(name, Weight::Dense(dense), opts, n_layers)
        }
        Weight::Dense(a) => {
            let a = dense_out(a)?;
            match (target, module) {
                (Some(spec), Some(m)) if !opts.dequantize && quantizable(&shape, spec) => {
                    let (qw, s, b) = quantize(&a, spec.group, spec.bits)?;
                    Ok(triplet(m, qw, s, b, spec))
                }
                _ => Ok((vec![(name.to_string(), a)], None)),
            }
        }
    }
}

/// The config's `quantization` block: the most common setting, with per-module overrides.
fn quantization_block(specs: &BTreeMap<String, (QuantSpec, Option<MxFormat>)>) -> Option<Quantization> {
    let key = |(s, f): &(QuantSpec, Option<MxFormat>)| (s.bits, s.group, f.map(MxFormat::mode));
    let mut counts: BTreeMap<(i32, i32, Option<&str>), usize> = BTreeMap::new();
    for s in specs.values() {
        *counts.entry(key(s)).or_default() += 1;
    }
    let (&top, _) = counts.iter().max_by_key(|(_, &c)| c)?;
    let (default, default_format) = *specs.values().find(|s| key(s) == top).expect("counted from specs");
    let differs: Vec<(&String, &(QuantSpec, Option<MxFormat>))> = specs.iter().filter(|(_, s)| key(s) != top).collect();
    let overrides = differs.iter().map(|(m, (s, _))| ((*m).clone(), Some(*s))).collect();
    let formats = differs.iter().filter_map(|(m, (_, f))| f.map(|f| ((*m).clone(), f))).collect();
    Some(Quantization { default, default_format, overrides, formats })
}

/// Views an evaluated, row-contiguous array as safetensors data, borrowed from MLX's buffer: the
/// shard is streamed to disk without a second copy of the weights in memory.
fn tensor_bytes<'a>(name: &str, a: &'a Array) -> Result<TensorBytes<'a>> {
    mlx_ext::tensor_bytes::tensor_bytes(a).map_err(|e| match e {
        BytesError::Read(e) => cfg_err(Path::new(name), format!("reading tensor data: {e}")),
        BytesError::Dtype(other) => cfg_err(Path::new(name), format!("cannot write dtype {other:?}")),
        BytesError::BigEndian => cfg_err(Path::new(name), "writing safetensors needs a little-endian host"),
    })
}

/// Gives a written file or directory the usual modes (0644 / 0755). The safetensors crate
/// writes through a private temporary file (mode 0600), which would leave shared model
/// directories unreadable to other users.
fn normal_permissions(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = if path.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
    }
    Ok(())
}

/// Groups tensors (in name order) into shards of at most `max` bytes; a larger tensor gets a
/// shard of its own.
fn plan_shards(sizes: &[(String, u64)], max: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut current = 0u64;
    for (i, (_, n)) in sizes.iter().enumerate() {
        match shards.last_mut() {
            Some(last) if current + n <= max => last.push(i),
            _ => {
                shards.push(vec![i]);
                current = 0;
            }
        }
        current += n;
    }
    shards
}

/// Fails unless `out` can be (re)placed.
pub fn check_output(out: &Path, force: bool) -> Result<()> {
    if out.exists() && !force {
        return Err(ModelError::Invalid { flag: "--out", message: format!("{} exists; pass --force to replace it", out.display()) });
    }
    Ok(())
}

/// Converts `src` and writes it to `out` atomically: everything goes to a temporary directory
/// beside `out`, which is renamed into place only when complete. `progress` is called once per
/// source tensor converted and once per shard written.
pub fn write(src: Source, out: &Path, opts: &ConvertOptions, progress: &mut dyn FnMut(&str)) -> Result<Report> {
    check_output(out, opts.force)?;
    let mut tensors: BTreeMap<String, Array> = BTreeMap::new();
    let mut specs: BTreeMap<String, (QuantSpec, Option<MxFormat>)> = BTreeMap::new();
    let n_layers = src.config.get("num_hidden_layers").and_then(Value::as_u64).unwrap_or(0) as usize;
    for (name, w) in src.weights {
        let (arrays, spec) = convert_weight(&name, w, opts, n_layers)?;
        if let Some(s) = spec {
            specs.insert(name.trim_end_matches(".weight").to_string(), s);
        }
        for (n, a) in arrays {
            // Row-contiguous so the shard writer can hand MLX's buffer to the file as is
            // (a no-op for the already contiguous arrays quantize/convert produce).
            let a = a.contiguous()?;
            a.eval()?;
            tensors.insert(n, a);
        }
        progress(&name);
    }
    let mut config = src.config;
    let obj = config.as_object_mut().ok_or_else(|| cfg_err(out, "config is not a JSON object"))?;
    if let Some(q) = quantization_block(&specs) {
        obj.insert("quantization".into(), q.to_json());
        obj.insert("quantization_config".into(), q.to_json());
    }

    let name = out.file_name().ok_or_else(|| cfg_err(out, "--out has no directory name"))?.to_string_lossy().into_owned();
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|source| ModelError::Io { path: parent.into(), source })?;
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ModelError::Io { path, source }
    };
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir(&tmp).map_err(io(&tmp))?;
    let result = write_contents(&tmp, &config, &tensors, &src.files, opts.max_shard_bytes, progress);
    let (shards, bytes) = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    if out.exists() {
        let old = parent.join(format!(".{name}.old-{}", std::process::id()));
        std::fs::rename(out, &old).map_err(io(out))?;
        std::fs::rename(&tmp, out).map_err(io(out))?;
        let removed = if old.is_dir() { std::fs::remove_dir_all(&old) } else { std::fs::remove_file(&old) };
        removed.map_err(io(&old))?;
    } else {
        std::fs::rename(&tmp, out).map_err(io(out))?;
    }
    Ok(Report { tensors: tensors.len(), quantized: specs.len(), shards, bytes })
}

fn write_contents(
    dir: &Path,
    config: &Value,
    tensors: &BTreeMap<String, Array>,
    files: &[(String, String)],
    max_shard_bytes: u64,
    progress: &mut dyn FnMut(&str),
) -> Result<(usize, u64)> {
    let write_text = |file: &str, text: &str| -> Result<()> {
        let p = dir.join(file);
        std::fs::write(&p, text).map_err(|source| ModelError::Io { path: p.clone(), source })?;
        normal_permissions(&p)
    };
    normal_permissions(dir)?;
    let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_default();
    write_text(CONFIG_FILE, &pretty(config))?;
    for (f, text) in files {
        write_text(f, text)?;
    }
    let sizes: Vec<(String, u64)> = tensors.iter().map(|(n, a)| (n.clone(), a.nbytes() as u64)).collect();
    let total: u64 = sizes.iter().map(|(_, n)| n).sum();
    let shards = plan_shards(&sizes, max_shard_bytes.max(1));
    let arrays: Vec<&Array> = tensors.values().collect();
    let metadata: Option<HashMap<String, String>> = Some([("format".to_string(), "mlx".to_string())].into());
    let mut weight_map = serde_json::Map::new();
    for (k, shard) in shards.iter().enumerate() {
        let file = if shards.len() == 1 {
            SINGLE_FILE.to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", k + 1, shards.len())
        };
        let mut data = Vec::with_capacity(shard.len());
        for &i in shard {
            let name = &sizes[i].0;
            data.push((name.clone(), tensor_bytes(name, arrays[i])?));
            weight_map.insert(name.clone(), Value::String(file.clone()));
        }
        let path = dir.join(&file);
        safetensors::serialize_to_file(data.iter().map(|(n, b)| (n.as_str(), b)), metadata.clone(), &path)
            .map_err(|e| cfg_err(&path, format!("writing safetensors: {e}")))?;
        normal_permissions(&path)?;
        progress(&file);
    }
    if shards.len() > 1 {
        let index = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
        write_text(INDEX_FILE, &pretty(&index))?;
    }
    Ok((shards.len(), total))
}

/// Whether `path` looks like an MLX/HF model directory.
pub fn is_model_dir(path: &Path) -> bool {
    path.join(CONFIG_FILE).is_file()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_respect_the_limit_and_keep_big_tensors_whole() {
        let sizes: Vec<(String, u64)> = [40, 40, 30, 200, 10].iter().enumerate().map(|(i, &n)| (i.to_string(), n)).collect();
        let plan = plan_shards(&sizes, 100);
        assert_eq!(plan, vec![vec![0, 1], vec![2], vec![3], vec![4]]);
        for shard in &plan {
            let total: u64 = shard.iter().map(|&i| sizes[i].1).sum();
            assert!(shard.len() == 1 || total <= 100);
        }
    }

    #[test]
    fn mixed_recipe_picks_mlx_lm_layers() {
        let plan = QuantPlan { base: QuantSpec { bits: 3, group: 64 }, mixed: MixedRecipe::parse("mixed_4_6"), embed_bits: None };
        // 30 layers: the first and last eighth (0-2, 26-29) and every third layer from 5.
        let high: Vec<usize> =
            (0..30).filter(|i| plan.spec_for(&format!("model.layers.{i}.mlp.down_proj"), 30).bits == 6).collect();
        assert_eq!(high, vec![0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]);
        for i in 0..30 {
            let v = plan.spec_for(&format!("model.layers.{i}.self_attn.v_proj"), 30);
            assert_eq!(v.bits, if high.contains(&i) { 6 } else { 4 }, "layer {i}");
            assert_eq!(plan.spec_for(&format!("model.layers.{i}.self_attn.q_proj"), 30).bits, 4);
            assert_eq!(plan.spec_for(&format!("model.layers.{i}.mlp.gate_proj"), 30).bits, 4);
        }
        assert_eq!(plan.spec_for("lm_head", 30), QuantSpec { bits: 6, group: 64 });
        // mlx-lm leaves the embedding at the low setting; --q-embed-bits raises it and lm_head.
        assert_eq!(plan.spec_for("model.embed_tokens", 30).bits, 4);
        let embed8 = QuantPlan { embed_bits: Some(8), ..plan };
        assert_eq!((embed8.spec_for("model.embed_tokens", 30).bits, embed8.spec_for("lm_head", 30).bits), (8, 8));
        assert!(MixedRecipe::parse("mixed_4_8").is_none());
        let uniform = QuantPlan { embed_bits: Some(8), ..QuantPlan::uniform(QuantSpec { bits: 4, group: 32 }) };
        assert_eq!(uniform.spec_for("model.layers.0.mlp.down_proj", 30).bits, 4);
        assert_eq!(uniform.spec_for("model.embed_tokens", 30), QuantSpec { bits: 8, group: 32 });
    }

    #[test]
    fn block_takes_the_most_common_setting() {
        let q4 = QuantSpec { bits: 4, group: 32 };
        let q8 = QuantSpec { bits: 8, group: 32 };
        let mx = (QuantSpec { bits: 4, group: 32 }, Some(MxFormat::Mxfp4));
        let specs: BTreeMap<String, (QuantSpec, Option<MxFormat>)> =
            [("a".into(), (q4, None)), ("b".into(), (q4, None)), ("c".into(), (q8, None)), ("d".into(), mx)].into_iter().collect();
        let q = quantization_block(&specs).unwrap();
        assert_eq!((q.default, q.default_format), (q4, None));
        assert_eq!(q.for_module("c"), Some(q8));
        // Same widths as the default, another mode: an override of its own.
        assert_eq!((q.for_module("d"), q.format_for("d"), q.format_for("a")), (Some(q4), Some(MxFormat::Mxfp4), None));
        assert_eq!(q.overrides.len(), 2);
    }
}
