//! Saved caches: one sequence's per-layer caches in a safetensors file, quantized exactly as
//! stored, so a long prompt is prefilled once and reused (mlx-lm's prompt-cache files).
//!
//! Tensors are `layers.{i}.{name}` with the names of [`KvCache::state`] (only the live tokens,
//! never the allocated capacity) and `token_ids` (`u32`, the tokens the cache holds). The
//! `__metadata__` string map records what the cache is only valid with: the format version,
//! the model's identity, the K/V setting in its canonical text ([`KvSpec`]'s `Display`, plus
//! the `--kv-layers` overrides and every layer's resolved spec), head_dim, layer count, token
//! count and the float dtype. Loading checks all of them before building a cache, and a
//! mismatch names both sides.

use crate::cache::{CacheOptions, KvCache};
use crate::error::{KvError, Result};
use crate::spec::{KvSpec, LayerOverrides};
use mlx_ext::tensor_bytes::{tensor_bytes, BytesError, TensorBytes};
use mlx_rs::{Array, Dtype};
use safetensors::{Dtype as StDtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Written as `format`; a file without it is some other safetensors file.
pub const FORMAT: &str = "kvsplit-mlx-kv-cache";
/// Bumped whenever a reader of the previous version would misread a new file.
pub const FORMAT_VERSION: u32 = 1;

/// What a cache is valid with: everything the file records besides the tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheMeta {
    /// A hash the caller derives from the model (the cache is only valid with the same weights).
    pub model_id: String,
    /// A readable name for messages (e.g. the model's file name); not checked.
    pub model_name: String,
    pub spec: KvSpec,
    pub layers: LayerOverrides,
    pub head_dim: usize,
    pub n_layers: usize,
    /// The float dtype of unquantized tokens (sinks, residual tail, dense bodies).
    pub float_dtype: Dtype,
    /// The tokens the cache holds, in order.
    pub tokens: Vec<u32>,
}

impl CacheMeta {
    /// The canonical text of the whole setting: the spec, with `--kv-layers` when given.
    pub fn setting(&self) -> String {
        setting_text(&self.spec, &self.layers)
    }

    /// Every layer's resolved spec, in canonical text.
    fn layer_specs(&self) -> Vec<String> {
        (0..self.n_layers).map(|i| self.layers.apply(&self.spec, i, self.n_layers).to_string()).collect()
    }
}

fn setting_text(spec: &KvSpec, layers: &LayerOverrides) -> String {
    let layers = layers.to_string();
    if layers.is_empty() {
        spec.to_string()
    } else {
        format!("{spec} --kv-layers {layers}")
    }
}

/// What this run needs a loaded cache to match. `setting` is `None` when the run takes the
/// file's K/V setting.
pub struct Expected<'a> {
    pub model_id: &'a str,
    pub model_name: &'a str,
    pub setting: Option<(&'a KvSpec, &'a LayerOverrides)>,
    pub head_dim: usize,
    pub n_layers: usize,
    pub float_dtype: Dtype,
}

fn file_err(path: &Path, message: impl Into<String>) -> KvError {
    KvError::CacheFile { path: path.to_path_buf(), message: message.into() }
}

/// Safetensors stores little-endian data, the memory order of every host MLX runs on.
fn bytes_of(a: &Array) -> Result<TensorBytes<'_>> {
    tensor_bytes(a).map_err(|e| match e {
        BytesError::Read(e) => KvError::Shape(format!("reading cache data: {e}")),
        BytesError::Dtype(other) => KvError::Shape(format!("cannot save a {other:?} array")),
        BytesError::BigEndian => KvError::Shape("saving a cache needs a little-endian host".into()),
    })
}

fn dtype_name(d: Dtype) -> &'static str {
    match d {
        Dtype::Float32 => "float32",
        Dtype::Float16 => "float16",
        Dtype::Bfloat16 => "bfloat16",
        _ => "other",
    }
}

fn dtype_from_name(s: &str) -> Option<Dtype> {
    Some(match s {
        "float32" => Dtype::Float32,
        "float16" => Dtype::Float16,
        "bfloat16" => Dtype::Bfloat16,
        _ => return None,
    })
}

/// Writes `caches` (one per layer, in order) and `meta` to `path`. The file is written beside
/// `path` and renamed over it, so an interrupted save never leaves a truncated cache behind.
pub fn save(path: &Path, caches: &[KvCache], meta: &CacheMeta) -> Result<()> {
    if cfg!(target_endian = "big") {
        return Err(file_err(path, "saving needs a little-endian host"));
    }
    if caches.len() != meta.n_layers {
        return Err(file_err(path, format!("{} caches for {} layers", caches.len(), meta.n_layers)));
    }
    let offset = caches.first().map_or(0, KvCache::offset);
    if offset != meta.tokens.len() {
        return Err(file_err(path, format!("the cache holds {offset} tokens but {} token ids were given", meta.tokens.len())));
    }
    let layer_specs = meta.layer_specs();
    let mut arrays: Vec<(String, Array)> = Vec::new();
    for (i, cache) in caches.iter().enumerate() {
        if cache.spec().to_string() != layer_specs[i] {
            return Err(file_err(path, format!("layer {i} runs {} but the setting gives it {}", cache.spec(), layer_specs[i])));
        }
        if cache.offset() != offset {
            return Err(file_err(path, format!("layer {i} holds {} tokens, layer 0 {offset}", cache.offset())));
        }
        for (name, a) in cache.state()? {
            arrays.push((format!("layers.{i}.{name}"), a.contiguous()?));
        }
    }
    if !meta.tokens.is_empty() {
        arrays.push(("token_ids".into(), Array::from_slice(&meta.tokens, &[meta.tokens.len() as i32])));
    }
    mlx_rs::transforms::eval(arrays.iter().map(|(_, a)| a))?;
    let views: Vec<(String, TensorBytes)> = arrays.iter().map(|(n, a)| Ok((n.clone(), bytes_of(a)?))).collect::<Result<_>>()?;
    let md: HashMap<String, String> = [
        ("format", FORMAT.to_string()),
        ("format_version", FORMAT_VERSION.to_string()),
        ("model_id", meta.model_id.clone()),
        ("model_name", meta.model_name.clone()),
        ("kv_spec", meta.spec.to_string()),
        ("kv_layers", meta.layers.to_string()),
        ("layer_specs", layer_specs.join(";")),
        ("head_dim", meta.head_dim.to_string()),
        ("n_layers", meta.n_layers.to_string()),
        ("tokens", meta.tokens.len().to_string()),
        ("float_dtype", dtype_name(meta.float_dtype).to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let tmp = partial_path(path);
    safetensors::serialize_to_file(views.iter().map(|(n, b)| (n.as_str(), b)), Some(md), &tmp)
        .map_err(|e| file_err(&tmp, format!("writing: {e}")))?;
    std::fs::rename(&tmp, path).map_err(|e| file_err(path, format!("renaming {} into place: {e}", tmp.display())))
}

fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

/// Reads the metadata (the token ids included) and checks the format, the version and that
/// the recorded settings agree with each other.
fn parse_meta(path: &Path, st: &SafeTensors, md: &HashMap<String, String>) -> Result<CacheMeta> {
    let get = |key: &str| md.get(key).map(String::as_str).ok_or_else(|| file_err(path, format!("metadata has no '{key}'")));
    if get("format").ok() != Some(FORMAT) {
        return Err(file_err(path, format!("not a saved KV cache (no metadata format = {FORMAT})")));
    }
    let version = get("format_version")?;
    if version != FORMAT_VERSION.to_string() {
        return Err(file_err(path, format!("format version {version}; this build reads version {FORMAT_VERSION}")));
    }
    let num = |key: &str| -> Result<usize> {
        let v = get(key)?;
        v.parse().map_err(|_| file_err(path, format!("metadata '{key}' = '{v}' is not a number")))
    };
    let spec = KvSpec::from_canonical(get("kv_spec")?, "metadata 'kv_spec'").map_err(|e| file_err(path, e.to_string()))?;
    let layers = LayerOverrides::parse(get("kv_layers")?).map_err(|e| file_err(path, format!("metadata 'kv_layers': {e}")))?;
    let float_dtype = dtype_from_name(get("float_dtype")?).ok_or_else(|| file_err(path, format!("metadata 'float_dtype' = '{}' is unknown", md["float_dtype"])))?;
    let n_tokens = num("tokens")?;
    let tokens = if n_tokens == 0 {
        Vec::new()
    } else {
        let t = st.tensor("token_ids").map_err(|e| file_err(path, format!("tensor 'token_ids': {e}")))?;
        if t.dtype() != StDtype::U32 || t.shape() != [n_tokens] {
            return Err(file_err(path, format!("tensor 'token_ids' is {:?} {:?}; expected U32 [{n_tokens}]", t.dtype(), t.shape())));
        }
        t.data().chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    };
    let meta = CacheMeta {
        model_id: get("model_id")?.to_string(),
        model_name: get("model_name")?.to_string(),
        spec,
        layers,
        head_dim: num("head_dim")?,
        n_layers: num("n_layers")?,
        float_dtype,
        tokens,
    };
    // The overrides are resolved again here; the recorded result must be what they give.
    let recorded = get("layer_specs")?;
    if meta.layer_specs().join(";") != recorded {
        return Err(file_err(path, format!("layer specs '{recorded}' disagree with {}", meta.setting())));
    }
    Ok(meta)
}

/// Checks a file's metadata against what the run needs; each message names both values.
fn check(path: &Path, m: &CacheMeta, want: &Expected) -> Result<()> {
    let ours = want.setting.map(|(s, l)| setting_text(s, l));
    if m.model_id != want.model_id {
        let with = ours.as_deref().map_or(String::new(), |s| format!(" with {s}"));
        return Err(file_err(
            path,
            format!(
                "made for model {} (id {}) with {}; this run uses model {} (id {}){with}",
                m.model_name,
                m.model_id,
                m.setting(),
                want.model_name,
                want.model_id
            ),
        ));
    }
    if m.head_dim != want.head_dim || m.n_layers != want.n_layers {
        return Err(file_err(
            path,
            format!("holds {} layers of head_dim {}; the model has {} layers of head_dim {}", m.n_layers, m.head_dim, want.n_layers, want.head_dim),
        ));
    }
    if let (Some(ours), Some((spec, layers))) = (&ours, want.setting) {
        let same = (0..m.n_layers).all(|i| m.layers.apply(&m.spec, i, m.n_layers).to_string() == layers.apply(spec, i, m.n_layers).to_string());
        if !same {
            return Err(file_err(path, format!("made with {} (--kv flags); this run asks for {ours}", m.setting())));
        }
    }
    if m.float_dtype != want.float_dtype {
        return Err(file_err(
            path,
            format!("holds {} tokens; this backend computes in {}", dtype_name(m.float_dtype), dtype_name(want.float_dtype)),
        ));
    }
    Ok(())
}

/// Reads only the metadata: enough to learn a file's setting and model before loading it.
pub fn read_meta(path: &Path) -> Result<CacheMeta> {
    with_file(path, |st, md| parse_meta(path, st, md))
}

fn with_file<T>(path: &Path, f: impl FnOnce(&SafeTensors, &HashMap<String, String>) -> Result<T>) -> Result<T> {
    let file = std::fs::File::open(path).map_err(|e| file_err(path, format!("opening: {e}")))?;
    // SAFETY: read-only map, dropped before returning; every tensor is copied into MLX.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| file_err(path, format!("reading: {e}")))?;
    let (_, header) = SafeTensors::read_metadata(&mmap).map_err(|e| file_err(path, format!("not a valid safetensors file: {e}")))?;
    let st = SafeTensors::deserialize(&mmap).map_err(|e| file_err(path, format!("not a valid safetensors file: {e}")))?;
    let md = header.metadata().clone().unwrap_or_default();
    f(&st, &md)
}

fn mlx_dtype(d: StDtype) -> Option<Dtype> {
    Some(match d {
        StDtype::F32 => Dtype::Float32,
        StDtype::F16 => Dtype::Float16,
        StDtype::BF16 => Dtype::Bfloat16,
        StDtype::U32 => Dtype::Uint32,
        _ => return None,
    })
}

/// Loads a saved cache after checking it against `want`: its metadata and one cache per layer,
/// holding the same bytes the saved caches held.
pub fn load(path: &Path, want: &Expected) -> Result<(CacheMeta, Vec<KvCache>)> {
    with_file(path, |st, md| {
        let meta = parse_meta(path, st, md)?;
        check(path, &meta, want)?;
        let mut per_layer: Vec<BTreeMap<String, Array>> = (0..meta.n_layers).map(|_| BTreeMap::new()).collect();
        for (name, view) in st.iter() {
            if name == "token_ids" {
                continue;
            }
            let bad_name = || file_err(path, format!("unexpected tensor '{name}'"));
            let (layer, rest) = name.strip_prefix("layers.").and_then(|r| r.split_once('.')).ok_or_else(bad_name)?;
            let layer: usize = layer.parse().map_err(|_| bad_name())?;
            let slot = per_layer.get_mut(layer).ok_or_else(bad_name)?;
            let dtype = mlx_dtype(view.dtype()).ok_or_else(|| file_err(path, format!("tensor '{name}' has dtype {:?}", view.dtype())))?;
            let shape: Vec<i32> = view.shape().iter().map(|&d| i32::try_from(d).map_err(|_| bad_name())).collect::<Result<_>>()?;
            // SAFETY: `deserialize` checked that the data holds exactly shape x dtype bytes, and
            // MLX copies the buffer.
            let a = unsafe { Array::from_raw_data(view.data().as_ptr().cast(), &shape, dtype) };
            slot.insert(rest.to_string(), a);
        }
        let caches = per_layer
            .into_iter()
            .enumerate()
            .map(|(i, mut arrays)| {
                let spec = meta.layers.apply(&meta.spec, i, meta.n_layers);
                let cache = KvCache::from_state(spec, meta.head_dim, CacheOptions::default(), meta.float_dtype, &mut arrays)
                    .map_err(|e| file_err(path, format!("layer {i}: {e}")))?;
                if cache.offset() != meta.tokens.len() {
                    return Err(file_err(path, format!("layer {i} holds {} tokens; the metadata says {}", cache.offset(), meta.tokens.len())));
                }
                Ok(cache)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((meta, caches))
    })
}
