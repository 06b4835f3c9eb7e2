//! Hugging Face tokenizer files: loading `tokenizer.json` (through the `tokenizers` crate) with
//! `tokenizer_config.json` / `generation_config.json` into a [`Tokenizer`], and writing those
//! files for a GGUF vocabulary, for `convert`. The `tokenizer.json` written is the pipeline
//! [`Tokenizer::from_gguf`] runs, serialized, so a converted directory encodes as its GGUF did.

use crate::gguf::GgufFile;
use crate::tokenizer::{Parts, TokenType, Tokenizer, TokenizerError};
use serde_json::{json, Value};
use std::path::Path;

fn invalid(path: &Path, reason: impl Into<String>) -> TokenizerError {
    TokenizerError::Invalid { path: path.display().to_string(), reason: reason.into() }
}

fn read_json(path: &Path) -> Result<Option<Value>, TokenizerError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map(Some).map_err(|e| invalid(path, format!("invalid JSON: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(invalid(path, e.to_string())),
    }
}

/// A token written as a string or as `{"content": ...}` (both occur in tokenizer_config.json).
fn token_content(v: Option<&Value>) -> Option<&str> {
    match v? {
        Value::String(s) => Some(s),
        Value::Object(o) => o.get("content").and_then(Value::as_str),
        _ => None,
    }
}

/// Ids from `eos_token_id` fields, which are an integer or a list.
fn id_list(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|x| x as u32).collect(),
        _ => vec![],
    }
}

/// Whether a `decoder` (or one inside a `Sequence`) is of `kind`.
fn has_component(v: Option<&Value>, list_key: &str, kind: &str) -> bool {
    let Some(v) = v else { return false };
    if v.get("type").and_then(Value::as_str) == Some(kind) {
        return true;
    }
    v.get(list_key).and_then(Value::as_array).is_some_and(|l| l.iter().any(|c| has_component(Some(c), list_key, kind)))
}

/// The parts of `tokenizer.json` read besides what the `tokenizers` crate builds. The
/// vocabulary and merges (tens of MB for 256k vocabularies) are skipped, not built as JSON
/// values a second time.
#[derive(serde::Deserialize)]
struct Layout {
    #[serde(default)]
    normalizer: Value,
    #[serde(default)]
    pre_tokenizer: Value,
    #[serde(default)]
    decoder: Value,
    #[serde(default)]
    model: ModelLayout,
}

#[derive(serde::Deserialize, Default)]
struct ModelLayout {
    #[serde(default)]
    byte_fallback: Option<bool>,
}

/// Loads the tokenizer of an HF/MLX model directory. `config_eos` is `config.json`'s
/// `eos_token_id`, one more source of end-of-generation ids.
pub fn load(dir: &Path, config_eos: Option<&Value>) -> Result<Tokenizer, TokenizerError> {
    let path = dir.join("tokenizer.json");
    let text = std::fs::read_to_string(&path).map_err(|e| invalid(&path, e.to_string()))?;
    let raw: Layout = serde_json::from_str(&text).map_err(|e| invalid(&path, format!("invalid JSON: {e}")))?;
    let hf: tokenizers::Tokenizer = text.parse().map_err(|e| invalid(&path, format!("{e}")))?;
    let tcfg = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
    let gen = read_json(&dir.join("generation_config.json"))?.unwrap_or(Value::Null);

    let vocab = hf.get_vocab(true);
    let n = vocab.values().map(|&id| id as usize + 1).max().unwrap_or(0);
    let mut tokens = vec![String::new(); n];
    let mut types = vec![TokenType::Unused; n];
    for (t, &id) in &vocab {
        tokens[id as usize] = t.clone();
        types[id as usize] = TokenType::Normal;
    }
    for (&id, added) in hf.get_added_tokens_decoder().iter() {
        if (id as usize) < n {
            types[id as usize] = if added.special { TokenType::Control } else { TokenType::UserDefined };
        }
    }
    let byte_level = has_component(Some(&raw.decoder), "decoders", "ByteLevel");
    if raw.model.byte_fallback == Some(true) {
        for (i, t) in tokens.iter().enumerate() {
            if t.len() == 6 && t.starts_with("<0x") && t.ends_with('>') {
                types[i] = TokenType::Byte;
            }
        }
    }
    let id_of = |t: Option<&str>| t.and_then(|t| vocab.get(t).copied());
    let bos = id_of(token_content(tcfg.get("bos_token"))).or_else(|| id_list(gen.get("bos_token_id")).first().copied());
    let mut eos: Vec<u32> = id_of(token_content(tcfg.get("eos_token"))).into_iter().collect();
    for id in id_list(gen.get("eos_token_id")).into_iter().chain(id_list(config_eos)) {
        if (id as usize) < n && !eos.contains(&id) {
            eos.push(id);
        }
    }
    // When tokenizer_config.json does not say, the post-processor decides (Llama's adds BOS).
    let add_bos = match tcfg.get("add_bos_token").and_then(Value::as_bool) {
        Some(b) => b,
        None => {
            let with = hf.encode("a", true).map(|e| e.get_ids().to_vec()).unwrap_or_default();
            bos.is_some() && with.first().copied() == bos && with.len() > 1
        }
    };
    let add_space_prefix = !byte_level
        && (has_component(Some(&raw.normalizer), "normalizers", "Prepend")
            || has_component(Some(&raw.pre_tokenizer), "pretokenizers", "Metaspace"));
    let chat_template = match tcfg.get("chat_template") {
        Some(Value::String(s)) => Some(s.clone()),
        // A list of named templates: the default one.
        Some(Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template").and_then(Value::as_str))
            .map(String::from),
        _ => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
    };
    Ok(Tokenizer::from_parts(Parts {
        tokens,
        types,
        hf,
        byte_level,
        bos,
        eos,
        add_bos,
        add_eos: false,
        add_space_prefix,
        chat_template,
    }))
}

/// `tokenizer.json`, `tokenizer_config.json` and `generation_config.json` for a GGUF file's
/// `tokenizer.ggml.*` metadata: byte-level BPE (`gpt2`) or SentencePiece BPE (`llama`).
pub fn files_from_gguf(g: &GgufFile) -> Result<Vec<(String, String)>, TokenizerError> {
    let path = g.path().to_path_buf();
    let tok = Tokenizer::from_gguf(g)?;
    let tokenizer = tok.hf().to_string(true).map_err(|e| invalid(&path, format!("writing tokenizer.json: {e}")))?;
    let n = tok.vocab_size();
    let id = |key: &str| -> Result<Option<u32>, TokenizerError> {
        Ok(g.optional(key, GgufFile::get_u32)?.filter(|&i| (i as usize) < n))
    };
    let (eos, unk, pad) =
        (id("tokenizer.ggml.eos_token_id")?, id("tokenizer.ggml.unknown_token_id")?, id("tokenizer.ggml.padding_token_id")?);
    let name = |id: Option<u32>| id.and_then(|i| tok.token(i)).map(String::from);
    // tokenizer_config.json keys the added tokens by id and has no "id" field (transformers
    // warns on one). They are those `Tokenizer::from_gguf` splits out of text.
    let decoder: serde_json::Map<String, Value> = (0..n as u32)
        .filter_map(|i| {
            let special = match tok.token_type(i)? {
                TokenType::Unknown | TokenType::Control => true,
                TokenType::UserDefined => false,
                _ => return None,
            };
            let t = json!({"content": tok.token(i)?, "single_word": false, "lstrip": false, "rstrip": false,
                           "normalized": false, "special": special});
            Some((i.to_string(), t))
        })
        .collect();
    let mut tcfg = json!({
        "add_bos_token": tok.add_bos(), "add_eos_token": tok.add_eos(), "added_tokens_decoder": decoder,
        "bos_token": name(tok.bos_id()), "eos_token": name(eos), "unk_token": name(unk), "pad_token": name(pad),
        "clean_up_tokenization_spaces": false, "tokenizer_class": "PreTrainedTokenizerFast",
    });
    if g.get_str("tokenizer.ggml.model")? == "llama" {
        tcfg["add_prefix_space"] = json!(tok.add_space_prefix());
    }
    if let Some(t) = tok.chat_template() {
        tcfg["chat_template"] = json!(t);
    }
    if let Some(ctx) = g.metadata().find(|(k, _)| k.ends_with(".context_length")).and_then(|(_, v)| v.as_i128()) {
        tcfg["model_max_length"] = json!(ctx as u64);
    }
    let gen = json!({"bos_token_id": tok.bos_id(), "eos_token_id": eos, "pad_token_id": pad});
    let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_default();
    Ok(vec![
        ("tokenizer.json".into(), tokenizer),
        ("tokenizer_config.json".into(), pretty(&tcfg)),
        ("generation_config.json".into(), pretty(&gen)),
    ])
}
