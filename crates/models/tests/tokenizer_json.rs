//! The tokenizer files `convert` writes for a GGUF vocabulary, read back, against the tokenizer
//! built from the GGUF itself, on WikiText: Gemma-3-270M (SentencePiece BPE with byte fallback;
//! the merges are derived from the scores) and Qwen2.5-Coder-0.5B (byte-level BPE, `qwen2`
//! pre-tokenizer). Both sides run the `tokenizers` crate, so what is checked is that nothing is
//! lost in writing the files: the pipeline in `tokenizer.json` (as mlx-lm or transformers read
//! it, with the added tokens and the BOS post-processor) and the metadata of
//! `tokenizer_config.json` that our directory loader reads. That the GGUF tokenizer itself
//! matches llama.cpp is tokenizer_vocab.rs and llamacpp_logits.rs. SmolLM2's byte-level
//! vocabulary is covered in mlx_dir.rs. The real models come from scripts/fetch-models.sh.

use models::gguf::GgufFile;
use models::tokenizer::Tokenizer;
use std::path::PathBuf;

/// Characters of wiki.test.raw encoded (several thousand tokens, every kind of text the file has
/// near its start: headings, numbers, punctuation, non-ASCII names).
const SAMPLE_CHARS: usize = 20_000;

fn model(name: &str) -> PathBuf {
    test_support::assets::model(name)
}

fn wikitext() -> String {
    let path = test_support::assets::wikitext_test();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.chars().take(SAMPLE_CHARS).collect()
}

/// Writes the rebuilt tokenizer files of `gguf` into a fresh directory.
fn rebuilt(gguf: &GgufFile, tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kvsplit-tokjson-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (file, text) in models::tokenizer_json::files_from_gguf(gguf).unwrap() {
        std::fs::write(dir.join(file), text).unwrap();
    }
    dir
}

fn first_difference(want: &[u32], got: &[u32]) -> Option<usize> {
    want.iter().zip(got).position(|(a, b)| a != b).or((want.len() != got.len()).then_some(want.len().min(got.len())))
}

/// The `tokenizers` crate on the written tokenizer.json alone, and our directory loader
/// (tokenizer_json.rs, which adds BOS from tokenizer_config.json), must both give the GGUF
/// tokenizer's ids.
fn check(model_file: &str, min_tokens: usize, extra: &[&str]) {
    let g = GgufFile::open(model(model_file)).unwrap();
    let gguf_tok = Tokenizer::from_gguf(&g).unwrap();
    let dir = rebuilt(&g, model_file);
    let hf = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let dir_tok = models::tokenizer_json::load(&dir, None).unwrap();

    let sample = wikitext();
    let want = gguf_tok.encode(&sample, false);
    assert!(want.len() >= min_tokens, "sample too short: {} tokens", want.len());
    let got = hf.encode(sample.as_str(), false).unwrap().get_ids().to_vec();
    if let Some(i) = first_difference(&want, &got) {
        let ctx = |ids: &[u32]| -> Vec<String> {
            ids[i.saturating_sub(3)..(i + 3).min(ids.len())].iter().map(|&t| gguf_tok.token(t).unwrap_or("?").to_string()).collect()
        };
        panic!("{model_file}: tokenizer.json diverges at token {i} of {}: GGUF {:?}, tokenizer.json {:?}", want.len(), ctx(&want), ctx(&got));
    }
    assert_eq!(dir_tok.encode(&sample, true), gguf_tok.encode(&sample, true), "{model_file}: directory tokenizer with specials");
    for text in extra {
        let want = gguf_tok.encode(text, true);
        assert_eq!(dir_tok.encode(text, true), want, "{model_file}: {text:?}");
        let raw = hf.encode(*text, true).unwrap().get_ids().to_vec();
        assert_eq!(raw, want, "{model_file}: tokenizer.json alone, with specials: {text:?}");
        let plain = gguf_tok.encode_with(text, false, false);
        assert_eq!(dir_tok.encode_with(text, false, false), plain, "{model_file}: without special parsing: {text:?}");
        let ids = gguf_tok.encode(text, false);
        assert_eq!(dir_tok.decode(&ids), gguf_tok.decode(&ids), "{model_file}: decoding {text:?}");
        assert_eq!(hf.decode(&ids, true).unwrap(), gguf_tok.decode(&ids), "{model_file}: tokenizer.json decoding {text:?}");
    }
    assert_eq!(dir_tok.bos_id(), gguf_tok.bos_id());
    assert_eq!(dir_tok.add_bos(), gguf_tok.add_bos());
    assert!(gguf_tok.eos_ids().iter().all(|id| dir_tok.is_eos(*id)), "{model_file}: EOS ids {:?}", gguf_tok.eos_ids());
    assert_eq!(dir_tok.chat_template(), gguf_tok.chat_template());
    // transformers builds AddedToken(**entry) and warns on an "id" key.
    let tcfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap()).unwrap();
    let decoder = tcfg["added_tokens_decoder"].as_object().unwrap();
    assert!(!decoder.is_empty() && decoder.values().all(|t| t.get("id").is_none() && t["content"].is_string()));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn gemma3_sentencepiece_tokenizer_json_matches_gguf_on_wikitext() {
    check(
        "gemma-3-270m-q4_k_m.gguf",
        4000,
        &[
            "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
            "  leading spaces, tabs\tand\n\nnewlines  ",
            "naïve café – 東京 🙂 \u{1F9EC} bytes",
        ],
    );
}

#[test]
fn qwen2_byte_level_tokenizer_json_matches_gguf_on_wikitext() {
    check(
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        4000,
        &["<|im_start|>user\ndef f(x):\n    return x**2<|im_end|>\n", "naïve café – 東京 🙂 123456"],
    );
}
