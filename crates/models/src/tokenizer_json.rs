//! Hugging Face tokenizer files: loading `tokenizer.json` (through the `tokenizers` crate) with
//! `tokenizer_config.json` / `generation_config.json` into a [`Tokenizer`], and rebuilding those
//! files from GGUF metadata for `convert`.
//!
//! The rebuilt `tokenizer.json` states the tokenizer exactly as llama.cpp runs it, with every
//! control or user-defined token as an added token:
//! - byte-level BPE (`gpt2`): the vocabulary and merges, the pre-tokenizer regexes of
//!   `tokenizer.ggml.pre` as a `Sequence` of isolated `Split`s followed by a regex-free
//!   `ByteLevel` mapping;
//! - SentencePiece BPE (`llama`, e.g. Gemma): a BPE model with byte fallback whose merges are
//!   derived from the token scores (see [`spm_merges`]), spaces escaped as "▁" by the normalizer.

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
/// file's `tokenizer.ggml.*` metadata: byte-level BPE (`gpt2`) or SentencePiece BPE (`llama`).
pub fn files_from_gguf(g: &GgufFile) -> Result<Vec<(String, String)>, TokenizerError> {
    let path = g.path().to_path_buf();
    let model = g.get_str("tokenizer.ggml.model")?;
    let tokens = g.get_str_array("tokenizer.ggml.tokens")?;
    let n = tokens.len();
    let types: Vec<i64> = g.optional("tokenizer.ggml.token_type", GgufFile::get_int_array)?.unwrap_or_else(|| vec![1; n]);
    if types.len() != n {
        return Err(invalid(&path, format!("{} token types for {n} tokens", types.len())));
    }
    let id = |key: &str| -> Result<Option<u32>, TokenizerError> {
        Ok(g.optional(key, GgufFile::get_u32)?.filter(|&i| (i as usize) < n))
    };
    let (bos, eos, unk, pad) = (
        id("tokenizer.ggml.bos_token_id")?,
        id("tokenizer.ggml.eos_token_id")?,
        id("tokenizer.ggml.unknown_token_id")?,
        id("tokenizer.ggml.padding_token_id")?,
    );
    // The same defaults as the GGUF tokenizer: SentencePiece vocabularies add BOS and a space.
    let spm = model == "llama";
    let add_bos = g.optional("tokenizer.ggml.add_bos_token", GgufFile::get_bool)?.unwrap_or(spm);
    let add_eos = g.optional("tokenizer.ggml.add_eos_token", GgufFile::get_bool)?.unwrap_or(false);
    let add_space_prefix = g.optional("tokenizer.ggml.add_space_prefix", GgufFile::get_bool)?.unwrap_or(spm);

    let mut vocab = serde_json::Map::new();
    for (i, t) in tokens.iter().enumerate() {
        // First occurrence wins, as in the GGUF tokenizer.
        vocab.entry(t.clone()).or_insert(json!(i));
    }
    // llama.cpp types: 3 = control (special), 4 = user-defined (matched literally), 2 = unknown.
    // These are the tokens the GGUF tokenizer splits out of text before the model runs.
    let added_ids: Vec<usize> = (0..n).filter(|&i| matches!(types[i], 2..=4)).collect();
    let added_token = |i: usize| {
        json!({"id": i, "content": tokens[i], "single_word": false, "lstrip": false, "rstrip": false,
               "normalized": false, "special": types[i] != 4})
    };
    let added: Vec<Value> = added_ids.iter().map(|&i| added_token(i)).collect();
    let name = |id: Option<u32>| id.map(|i| tokens[i as usize].clone());
    let bos_processor = match (add_bos, bos) {
        (true, Some(b)) => {
            let t = &tokens[b as usize];
            Some(json!({"type": "TemplateProcessing",
                   "single": [{"SpecialToken": {"id": t, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                   "pair": [{"SpecialToken": {"id": t, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                            {"SpecialToken": {"id": t, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                   "special_tokens": {t.clone(): {"id": t, "ids": [b], "tokens": [t]}}}))
        }
        _ => None,
    };
    let (normalizer, pre_tokenizer, post_processor, decoder, model_json) = match model {
        "gpt2" => {
            let merges = g.get_str_array("tokenizer.ggml.merges")?;
            let pre = g.optional("tokenizer.ggml.pre", GgufFile::get_str)?.unwrap_or("default");
            let patterns = pre_patterns(pre)
                .ok_or_else(|| TokenizerError::UnsupportedPre { path: path.display().to_string(), pre: pre.into() })?;
            let mut merge_pairs = Vec::with_capacity(merges.len());
            for (i, m) in merges.iter().enumerate() {
                let at = m.char_indices().skip(1).find(|&(_, c)| c == ' ').map(|(i, _)| i);
                let at = at.ok_or_else(|| invalid(&path, format!("merge #{i} '{m}' has no space")))?;
                merge_pairs.push(json!([&m[..at], &m[at + 1..]]));
            }
            let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false});
            let mut pretok: Vec<Value> = patterns
                .iter()
                .map(|p| json!({"type": "Split", "pattern": {"Regex": p}, "behavior": "Isolated", "invert": false}))
                .collect();
            pretok.push(byte_level.clone());
            let model_json = json!({"type": "BPE", "dropout": null, "unk_token": name(unk), "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": crate::tokenizer::pre_ignores_merges(pre), "vocab": vocab, "merges": merge_pairs});
            let post = bos_processor.unwrap_or_else(|| byte_level.clone());
            (Value::Null, json!({"type": "Sequence", "pretokenizers": pretok}), post, byte_level, model_json)
        }
        "llama" => {
            let scores = g.get_f32_array("tokenizer.ggml.scores")?;
            if scores.len() != n {
                return Err(invalid(&path, format!("{} scores for {n} tokens", scores.len())));
            }
            let merges = spm_merges(tokens, scores);
            // SentencePiece sees the whole text with spaces escaped as "▁" (and, where the
            // vocabulary asks, one prepended); there is no pre-tokenizer.
            let replace = json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
            let normalizer = if add_space_prefix {
                json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u{2581}"}, replace]})
            } else {
                replace
            };
            let mut decoders = vec![
                json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
                json!({"type": "ByteFallback"}),
                json!({"type": "Fuse"}),
            ];
            if add_space_prefix {
                decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
            }
            let model_json = json!({"type": "BPE", "dropout": null, "unk_token": name(unk), "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                      "ignore_merges": false, "vocab": vocab, "merges": merges});
            let post = bos_processor.unwrap_or(Value::Null);
            (normalizer, Value::Null, post, json!({"type": "Sequence", "decoders": decoders}), model_json)
        }
        other => {
            return Err(invalid(
                &path,
                format!("tokenizer model '{other}' cannot be written as tokenizer.json (supported: gpt2, llama)"),
            ))
        }
    };
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": decoder,
        "model": model_json,
    });
    // tokenizer_config.json keys these by id and has no "id" field (transformers warns on one).
    let decoder: serde_json::Map<String, Value> = added_ids
        .iter()
        .map(|&i| {
            let mut t = added_token(i);
            t.as_object_mut().map(|o| o.remove("id"));
            (i.to_string(), t)
        })
        .collect();
    let mut tcfg = json!({
        "add_bos_token": add_bos, "add_eos_token": add_eos, "added_tokens_decoder": decoder,
        "bos_token": name(bos), "eos_token": name(eos), "unk_token": name(unk), "pad_token": name(pad),
        "clean_up_tokenization_spaces": false, "tokenizer_class": "PreTrainedTokenizerFast",
    });
    if spm {
        tcfg["add_prefix_space"] = json!(add_space_prefix);
    }
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

/// BPE merges equivalent to SentencePiece's score-driven merging, for a `tokenizers` BPE model.
///
/// SentencePiece (and llama.cpp's SPM tokenizer) repeatedly joins the adjacent pair whose
/// concatenation is the vocabulary token with the highest score. A BPE model joins the pair
/// with the lowest merge rank instead, so every way of writing a token as two vocabulary tokens
/// becomes a merge, ranked by the joined token's score, highest first. The orders differ only
/// on score ties between overlapping candidates, which SentencePiece breaks by position and
/// this ranking by token id and split point; in real vocabularies only control, user-defined
/// and byte tokens share scores, and those are split out of the text before merging.
fn spm_merges(tokens: &[String], scores: &[f32]) -> Vec<Value> {
    let mut ids: std::collections::HashMap<&str, usize> = std::collections::HashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        ids.entry(t.as_str()).or_insert(i);
    }
    let mut merges: Vec<(usize, usize, &str, &str)> = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        // A duplicate string is reached through its first id only.
        if ids.get(t.as_str()) != Some(&i) {
            continue;
        }
        for (at, _) in t.char_indices().skip(1) {
            let (l, r) = t.split_at(at);
            if ids.contains_key(l) && ids.contains_key(r) {
                merges.push((i, at, l, r));
            }
        }
    }
    merges.sort_by(|a, b| scores[b.0].total_cmp(&scores[a.0]).then(a.0.cmp(&b.0)).then(a.1.cmp(&b.1)));
    merges.into_iter().map(|(_, _, l, r)| json!([l, r])).collect()
}
