//! A request's `kv` field: the same syntax and validation as the CLI's K/V flags.
//!
//! - a string: a preset (`k8v4`, `fp16`, ...) or bits (`"8,4"`, `"4"`);
//! - an object: `{"bits": "8,4", "group_size": "64,32", "key_layout": "per-channel",
//!   "residual": 128, "sinks": 4, "rotate": "kv", "layers": "first:2=8,8", "plain": true}`,
//!   every key optional except `bits`; unknown keys are refused by name.
//!
//! A bare preset resolves as `--kv` does (the model's recipe, else the general choice);
//! `"plain": true` runs it uniform, as `--kv-plain`.

use crate::api::ApiError;
use mlx_kv::spec::parse_groups;
use mlx_kv::{KeyLayout, KvSpec, LayerOverrides, Rotation};
use models::generate::CacheSettings;
use models::recipe::{self, ModelShape, Pick, Resolved};
use serde_json::Value;

const KEYS: &[&str] = &["bits", "group_size", "key_layout", "residual", "sinks", "rotate", "layers", "quantized_kv_start", "plain"];

fn bad(param: &str, message: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(Some(param), format!("{param}: {message}"))
}

/// The cache setting of a request and its name: `default` when `kv` is absent; `max_kv_size`
/// always comes from the server. Presets resolve against `model` when given.
pub fn settings(kv: Option<&Value>, default: &Resolved, model: Option<&ModelShape>) -> Result<Resolved, ApiError> {
    let Some(kv) = kv else { return Ok(default.clone()) };
    let mut out = CacheSettings { max_kv_size: default.settings.max_kv_size, ..Default::default() };
    let mut pick = Pick::Auto;
    match kv {
        Value::String(s) => out.spec = KvSpec::parse(s).map_err(|e| bad("kv", e))?,
        Value::Object(m) => {
            if let Some(k) = m.keys().find(|k| !KEYS.contains(&k.as_str())) {
                return Err(bad("kv", format!("unknown key '{k}' (known: {})", KEYS.join(", "))));
            }
            let text = |key: &str| -> Result<Option<String>, ApiError> {
                match m.get(key) {
                    None | Some(Value::Null) => Ok(None),
                    Some(Value::String(s)) => Ok(Some(s.clone())),
                    Some(Value::Number(n)) => Ok(Some(n.to_string())),
                    Some(other) => Err(bad(&format!("kv.{key}"), format!("expected a string, got {other}"))),
                }
            };
            let count = |key: &str| -> Result<usize, ApiError> {
                match m.get(key) {
                    None | Some(Value::Null) => Ok(0),
                    Some(v) => v.as_u64().map(|n| n as usize).ok_or_else(|| bad(&format!("kv.{key}"), format!("expected a whole number, got {v}"))),
                }
            };
            let bits = text("bits")?.ok_or_else(|| bad("kv.bits", "missing (e.g. \"8,4\" or \"k8v4\")"))?;
            out.spec = KvSpec::parse(&bits).map_err(|e| bad("kv.bits", e))?;
            if let Some(g) = text("group_size")? {
                let (gk, gv) = parse_groups(&g).map_err(|e| bad("kv.group_size", e))?;
                out.spec.k.group = gk;
                out.spec.v.group = gv;
            }
            if let Some(l) = text("key_layout")? {
                out.spec.key_layout = l.parse::<KeyLayout>().map_err(|e| bad("kv.key_layout", e))?;
            }
            if let Some(r) = text("rotate")? {
                out.spec.rotation = r.parse::<Rotation>().map_err(|e| bad("kv.rotate", e))?;
            }
            out.spec.residual = count("residual")?;
            out.spec.sinks = count("sinks")?;
            out.spec.quantized_kv_start = count("quantized_kv_start")?;
            match m.get("plain") {
                None | Some(Value::Null) | Some(Value::Bool(false)) => {}
                Some(Value::Bool(true)) => pick = Pick::Plain,
                Some(other) => return Err(bad("kv.plain", format!("expected true or false, got {other}"))),
            }
            if let Some(l) = text("layers")? {
                out.layers = LayerOverrides::parse(&l).map_err(|e| bad("kv.layers", e))?;
            }
        }
        other => return Err(bad("kv", format!("expected a string or an object, got {other}"))),
    }
    match model {
        Some(m) => recipe::resolve(out, &pick, m).map_err(|e| bad("kv", e)),
        None => Ok(Resolved::given(out)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn presets_resolve_against_the_model_unless_plain() {
        let d = Resolved::given(CacheSettings::default());
        let m = ModelShape { id: "none".into(), n_layers: 2, head_dim: 64 };
        assert_eq!(settings(Some(&json!("k8v4")), &d, Some(&m)).unwrap().settings.spec.rotation, Rotation::KeysAndValues);
        let plain = settings(Some(&json!({"bits": "k8v4", "plain": true})), &d, Some(&m)).unwrap();
        assert_eq!(plain.settings.spec, KvSpec::bits(8, 4));
        assert_eq!((plain.name.as_str(), plain.source.as_str()), ("k8v4", "plain"));
        let general = settings(Some(&json!("k8v4")), &d, Some(&m)).unwrap();
        assert_eq!((general.name.as_str(), general.source.as_str()), ("k8v4-rotkv", "general"));
        let e = settings(Some(&json!({"bits": "k8v4", "plain": "yes"})), &d, Some(&m)).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("kv.plain"), "{}", e.message);
    }

    #[test]
    fn strings_and_objects_build_the_same_specs_as_the_cli() {
        let d = Resolved::given(CacheSettings::default());
        assert_eq!(settings(None, &d, None).unwrap().settings.spec, d.settings.spec);
        assert_eq!(settings(Some(&json!("k8v4")), &d, None).unwrap().settings.spec, KvSpec::bits(8, 4));
        assert_eq!(settings(Some(&json!("8,4")), &d, None).unwrap().settings.spec, KvSpec::bits(8, 4));
        let r = settings(Some(&json!({"bits": "4,4", "group_size": "64,32", "key_layout": "per-channel", "residual": 128, "rotate": "kv"})), &d, None).unwrap();
        assert_eq!(r.source, "custom");
        let s = r.settings;
        assert_eq!((s.spec.k.bits, s.spec.v.bits, s.spec.k.group, s.spec.v.group, s.spec.residual), (4, 4, 64, 32, 128));
        assert_eq!(s.spec.key_layout, KeyLayout::PerChannel);
        assert_eq!(s.spec.rotation, Rotation::KeysAndValues);
    }

    #[test]
    fn bad_kv_values_are_400s_naming_the_field() {
        let d = Resolved::given(CacheSettings::default());
        for (v, param) in [
            (json!("k7v4"), "kv"),
            (json!(3), "kv"),
            (json!({"group_size": "64"}), "kv.bits"),
            (json!({"bits": "8,4", "group_size": "48"}), "kv.group_size"),
            (json!({"bits": "8,4", "residual": -1}), "kv.residual"),
            (json!({"bits": "8,4", "colour": "red"}), "kv"),
            (json!({"bits": "8,4", "rotate": "q"}), "kv.rotate"),
        ] {
            let e = settings(Some(&v), &d, None).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{v}: {}", e.message);
            assert!(e.message.starts_with(param), "{v}: {}", e.message);
        }
    }
}
