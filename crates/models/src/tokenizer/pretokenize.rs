//! Pre-tokenizer regexes of byte-level BPE vocabularies, chosen by `tokenizer.ggml.pre`.
//!
//! The expressions are those of llama.cpp's `llama-vocab.cpp` (themselves taken from each
//! model's HF `tokenizer.json`). Several regexes are applied in sequence, as HF's `Sequence` of
//! `Split(Isolated)` pre-tokenizers: each one splits every chunk left by the previous one, and
//! both the matches and the text between them become chunks.

use fancy_regex::Regex;

const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The regexes for a `tokenizer.ggml.pre` value, or `None` if it is not supported. A missing key
/// means "default" (GPT-2's regex), as in llama.cpp.
pub(crate) fn patterns(pre: &str) -> Option<Vec<&'static str>> {
    Some(match pre {
        "default" | "gpt-2" | "gpt2" | "mpt" | "olmo" | "jais" | "trillion" | "phi-2" => vec![GPT2],
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "dbrx" | "smaug-bpe" | "pixtral" => vec![LLAMA3],
        "qwen2" | "stablelm2" | "hunyuan" | "deepseek-r1-qwen" | "megrez" => vec![QWEN2],
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b" => {
            vec![r"\p{N}", GPT2]
        }
        "falcon" => vec![r"[\p{P}\$\+<=>\^~\|`]+", GPT2, r"[0-9][0-9][0-9]"],
        "deepseek-coder" => vec![r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}"],
        "poro-chat" | "bloom" | "gpt3-finnish" => vec![r" ?[^(\s|.,!?…。，、।۔،)]+"],
        "viking" => vec![r" ?[^(\s|.,!?…。，、।۔،)]+", r"\p{N}"],
        _ => return None,
    })
}

/// Pre-tokenizer names llama3-style vocabularies use; they look whole words up before merging.
pub(crate) fn ignores_merges(pre: &str) -> bool {
    matches!(pre, "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral")
}

/// A compiled pre-tokenizer.
#[derive(Debug, Clone)]
pub(crate) struct PreTokenizer {
    regexes: Vec<Regex>,
}

impl PreTokenizer {
    /// `None` if `pre` is unknown.
    pub fn new(pre: &str) -> Option<Self> {
        // The table is fixed and covered by tests, so a regex that fails to compile cannot ship;
        // still, report it as unsupported rather than panic.
        let regexes = patterns(pre)?.into_iter().map(Regex::new).collect::<Result<_, _>>().ok()?;
        Some(Self { regexes })
    }

    /// Splits `text` into chunks whose concatenation is `text`.
    pub fn split<'t>(&self, text: &'t str) -> Vec<&'t str> {
        let mut chunks = vec![text];
        for re in &self.regexes {
            let mut next = Vec::with_capacity(chunks.len() * 2);
            for chunk in chunks {
                let mut last = 0;
                // A backtracking-limit error ends the matching of this chunk; the rest stays whole.
                for m in re.find_iter(chunk).map_while(Result::ok) {
                    if m.start() > last {
                        next.push(&chunk[last..m.start()]);
                    }
                    if m.end() > m.start() {
                        next.push(m.as_str());
                    }
                    last = m.end();
                }
                if last < chunk.len() {
                    next.push(&chunk[last..]);
                }
            }
            chunks = next;
        }
        chunks
    }
}
