//! Hugging Face tokenizer files: loading `tokenizer.json` (through the `tokenizers` crate) with
//! `tokenizer_config.json` / `generation_config.json` into a [`Tokenizer`], and rebuilding those
//! files from GGUF metadata for `convert`.
//!
//! The rebuilt `tokenizer.json` states the byte-level BPE exactly as llama.cpp runs it: the
//! vocabulary and merges, the pre-tokenizer regexes of `tokenizer.ggml.pre` as a `Sequence` of
//! isolated `Split`s followed by a regex-free `ByteLevel` mapping, and every control or
//! user-defined token as an added token.

use crate::gguf::GgufFile;
use crate::tokenizer::{pre_patterns, HfParts, TokenType, Tokenizer, TokenizerError};
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

/// Loads the tokenizer of an HF/MLX model directory. `config_eos` is `config.json`'s
/// `eos_token_id`, one more source of end-of-generation ids.
pub fn load(dir: &Path, config_eos: Option<&Value>) -> Result<Tokenizer, TokenizerError> {
    let path = dir.join("tokenizer.json");
    let text = std::fs::read_to_string(&path).map_err(|e| invalid(&path, e.to_string()))?;
    let raw: Value = serde_json::from_str(&text).map_err(|e| invalid(&path, format!("invalid JSON: {e}")))?;
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
    let byte_level = has_component(raw.get("decoder"), "decoders", "ByteLevel");
    if raw.pointer("/model/byte_fallback").and_then(Value::as_bool) == Some(true) {
        for (i, t) in tokens.iter().enumerate() {
            if t.len() == 6 && t.starts_with("<0x") && t.ends_with('>') {
                types[i] = TokenType::Byte;
            }
        }
    }
    let id_of = |t: Option<&str>| t.and_then(|t| vocab.get(t).copied());
    let bos = id_of(token_content(tcfg.get("bos_token"))).or_else(|| id_list(gen.get("bos_token_id")).first().copied());
    let unk = id_of(token_content(tcfg.get("unk_token")));
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
        && (has_component(raw.get("normalizer"), "normalizers", "Prepend")
            || has_component(raw.get("pre_tokenizer"), "pretokenizers", "Metaspace"));
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
    Ok(Tokenizer::from_hf_parts(HfParts {
        tokens,
        types,
        hf: Box::new(hf),
        byte_level,
        bos,
        eos,
        unk,
        add_bos,
        add_space_prefix,
        chat_template,
    }))
}

/// `tokenizer.json`, `tokenizer_config.json` and `generation_config.json` rebuilt from a GGUF
/// file's `tokenizer.ggml.*` metadata (byte-level BPE vocabularies).
pub fn files_from_gguf(g: &GgufFile) -> Result<Vec<(String, String)>, TokenizerError> {
    let path = g.path().to_path_buf();
    let model = g.get_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(invalid(
            &path,
            format!("tokenizer model '{model}' cannot be written as tokenizer.json yet (byte-level BPE 'gpt2' only)"),
        ));
    }
    let tokens = g.get_str_array("tokenizer.ggml.tokens")?;
    let n = tokens.len();
    let types: Vec<i64> = g.optional("tokenizer.ggml.token_type", GgufFile::get_int_array)?.unwrap_or_else(|| vec![1; n]);
    if types.len() != n {
        return Err(invalid(&path, format!("{} token types for {n} tokens", types.len())));
    }
    let merges = g.get_str_array("tokenizer.ggml.merges")?;
    let pre = g.optional("tokenizer.ggml.pre", GgufFile::get_str)?.unwrap_or("default");
    let patterns = pre_patterns(pre)
        .ok_or_else(|| TokenizerError::UnsupportedPre { path: path.display().to_string(), pre: pre.into() })?;
    let id = |key: &str| -> Result<Option<u32>, TokenizerError> {
        Ok(g.optional(key, GgufFile::get_u32)?.filter(|&i| (i as usize) < n))
    };
    let (bos, eos, unk, pad) = (
        id("tokenizer.ggml.bos_token_id")?,
        id("tokenizer.ggml.eos_token_id")?,
        id("tokenizer.ggml.unknown_token_id")?,
        id("tokenizer.ggml.padding_token_id")?,
    );
    let add_bos = g.optional("tokenizer.ggml.add_bos_token", GgufFile::get_bool)?.unwrap_or(false);
    let add_eos = g.optional("tokenizer.ggml.add_eos_token", GgufFile::get_bool)?.unwrap_or(false);

    let mut vocab = serde_json::Map::new();
    for (i, t) in tokens.iter().enumerate() {
        // First occurrence wins, as in the GGUF tokenizer.
        vocab.entry(t.clone()).or_insert(json!(i));
    }
    let mut merge_pairs = Vec::with_capacity(merges.len());
    for (i, m) in merges.iter().enumerate() {
        let at = m.char_indices().skip(1).find(|&(_, c)| c == ' ').map(|(i, _)| i);
        let at = at.ok_or_else(|| invalid(&path, format!("merge #{i} '{m}' has no space")))?;
        merge_pairs.push(json!([&m[..at], &m[at + 1..]]));
    }
    // llama.cpp types: 3 = control (special), 4 = user-defined (matched literally), 2 = unknown.
    let added: Vec<Value> = (0..n)
        .filter(|&i| matches!(types[i], 2..=4))
        .map(|i| {
            json!({"id": i, "content": tokens[i], "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": types[i] != 4})
        })
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false});
    let mut pretok: Vec<Value> = patterns
        .iter()
        .map(|p| json!({"type": "Split", "pattern": {"Regex": p}, "behavior": "Isolated", "invert": false}))
        .collect();
    pretok.push(byte_level.clone());
    let name = |id: Option<u32>| id.map(|i| tokens[i as usize].clone());
    let post = match (add_bos, bos) {
        (true, Some(b)) => {
            let t = &tokens[b as usize];
            json!({"type": "TemplateProcessing",
                   "single": [{"SpecialToken": {"id": t, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                   "pair": [{"SpecialToken": {"id": t, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                            {"SpecialToken": {"id": t, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                   "special_tokens": {t.clone(): {"id": t, "ids": [b], "tokens": [t]}}})
        }
        _ => byte_level.clone(),
    };
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": pretok},
        "post_processor": post,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": name(unk), "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": crate::tokenizer::pre_ignores_merges(pre), "vocab": vocab, "merges": merge_pairs}
    });
    let decoder: serde_json::Map<String, Value> = (0..n)
        .filter(|&i| matches!(types[i], 2..=4))
        .map(|i| {
            (i.to_string(), json!({"content": tokens[i], "single_word": false, "lstrip": false, "rstrip": false,
                                   "normalized": false, "special": types[i] != 4}))
        })
        .collect();
    let mut tcfg = json!({
        "add_bos_token": add_bos, "add_eos_token": add_eos, "added_tokens_decoder": decoder,
        "bos_token": name(bos), "eos_token": name(eos), "unk_token": name(unk), "pad_token": name(pad),
        "clean_up_tokenization_spaces": false, "tokenizer_class": "PreTrainedTokenizerFast",
    });
    if let Some(t) = g.optional("tokenizer.chat_template", GgufFile::get_str)? {
        tcfg["chat_template"] = json!(t);
    }
    if let Some(ctx) = g.metadata().find(|(k, _)| k.ends_with(".context_length")).and_then(|(_, v)| v.as_i128()) {
        tcfg["model_max_length"] = json!(ctx as u64);
    }
    let gen = json!({"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad});
    let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_default();
    Ok(vec![
        ("tokenizer.json".into(), pretty(&tokenizer)),
        ("tokenizer_config.json".into(), pretty(&tcfg)),
        ("generation_config.json".into(), pretty(&gen)),
    ])
}
