//! The GGUF tokenizer against llama.cpp's tokenizer test vectors (vocab-only GGUFs with
//! `.gguf.inp` inputs separated by `__ggml_vocab_test__` lines and `.gguf.out` expected ids, one
//! line per input; generated from the HF tokenizers). Fetch them with scripts/fetch-test-data.sh.
//!
//! Not covered, and why:
//! - bert-bge (WordPiece), nomic-bert-moe (T5/Unigram), gemma-4 (its own `gemma4` model): other
//!   tokenizer algorithms, not implemented.
//! - deepseek-llm: its pre-tokenizer uses a long hand-written letter class that is not
//!   reproduced here, so `tokenizer.ggml.pre = "deepseek-llm"` is reported as unsupported.
//! - qwen35: its pre-tokenizer regex is not known here (`tokenizer.ggml.pre = "qwen35"`).
//! - aquila, baichuan, gpt-neox: no `.inp/.out` vectors shipped.

use std::path::PathBuf;

use models::gguf::GgufFile;
use models::tokenizer::Tokenizer;

fn vocab_dir() -> PathBuf {
    test_support::assets::llama_vocab_dir()
}

/// Checks every test vector of `name` (llama.cpp's test-tokenizer-0: no BOS, no special parsing);
/// with `lossless`, also that decoding gives each input back.
fn check_vocab(name: &str) {
    check_vocab_opts(name, false)
}

fn check_vocab_opts(name: &str, lossless: bool) {
    let dir = vocab_dir();
    let gguf = GgufFile::open(dir.join(format!("ggml-vocab-{name}.gguf"))).unwrap();
    let tok = Tokenizer::from_gguf(&gguf).unwrap();
    let inp = std::fs::read_to_string(dir.join(format!("ggml-vocab-{name}.gguf.inp"))).unwrap();
    let out = std::fs::read_to_string(dir.join(format!("ggml-vocab-{name}.gguf.out"))).unwrap();
    let inputs: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    let expected: Vec<&str> = out.split('\n').collect();
    let mut failures = Vec::new();
    for (text, want) in inputs.iter().zip(&expected).take(inputs.len() - 1) {
        let want: Vec<u32> = want.split_whitespace().map(|t| t.parse().unwrap()).collect();
        let got = tok.encode_with(text, false, false);
        if got != want {
            failures.push(format!("{text:?}\n   want {want:?}\n    got {got:?}"));
        }
        if lossless && tok.decode(&got) != *text {
            failures.push(format!("{text:?} decodes to {:?}", tok.decode(&got)));
        }
    }
    assert!(failures.is_empty(), "{name}: {} of {} inputs differ:\n{}", failures.len(), inputs.len() - 1, failures.join("\n"));
}

#[test]
fn gpt2() {
    check_vocab_opts("gpt-2", true);
}

#[test]
fn llama_bpe() {
    check_vocab_opts("llama-bpe", true);
}

#[test]
fn qwen2() {
    check_vocab_opts("qwen2", true);
}

#[test]
fn llama_spm() {
    check_vocab_opts("llama-spm", true);
}

#[test]
fn phi3() {
    check_vocab("phi-3");
}

#[test]
fn starcoder() {
    check_vocab("starcoder");
}

#[test]
fn refact() {
    check_vocab("refact");
}

#[test]
fn command_r() {
    check_vocab("command-r");
}

#[test]
fn mpt() {
    check_vocab("mpt");
}

#[test]
fn falcon() {
    check_vocab("falcon");
}

#[test]
fn deepseek_coder() {
    check_vocab("deepseek-coder");
}
