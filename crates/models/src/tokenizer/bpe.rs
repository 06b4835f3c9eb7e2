//! Byte-level BPE (GPT-2 style, `tokenizer.ggml.model == "gpt2"`).
//!
//! Text bytes are mapped to printable characters (GPT-2's `bytes_to_unicode`), so every token is
//! a string of those characters; merges are applied lowest rank first.

use std::collections::HashMap;

/// GPT-2's reversible byte -> char table: printable Latin-1 bytes map to themselves, the rest to
/// U+0100 and up, so no token contains whitespace or control characters.
pub(crate) fn byte_to_char() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..256u32 {
        let printable = (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        let c = if printable {
            b
        } else {
            next += 1;
            next - 1
        };
        table[b as usize] = char::from_u32(c).expect("valid code point");
    }
    table
}

/// Merge ranks of a byte-level BPE vocabulary.
#[derive(Debug, Clone)]
pub(crate) struct Bpe {
    ranks: HashMap<(String, String), u32>,
    byte_chars: [char; 256],
    char_bytes: HashMap<char, u8>,
}

impl Bpe {
    /// Parses merges of the form "left right"; malformed lines are reported by index.
    pub fn new(merges: &[String]) -> Result<Self, usize> {
        let mut ranks = HashMap::with_capacity(merges.len());
        for (i, m) in merges.iter().enumerate() {
            // Split at the first space not at position 0 (a token may itself start with a space).
            let at = m.char_indices().skip(1).find(|&(_, c)| c == ' ').map(|(i, _)| i).ok_or(i)?;
            ranks.entry((m[..at].to_string(), m[at + 1..].to_string())).or_insert(i as u32);
        }
        let byte_chars = byte_to_char();
        let char_bytes = byte_chars.iter().enumerate().map(|(b, &c)| (c, b as u8)).collect();
        Ok(Self { ranks, byte_chars, char_bytes })
    }

    /// The byte-level form of raw text.
    pub fn encode_bytes(&self, text: &str) -> String {
        text.bytes().map(|b| self.byte_chars[b as usize]).collect()
    }

    /// The raw bytes of a byte-level token string (characters outside the table pass through).
    pub fn decode_chars(&self, token: &str, out: &mut Vec<u8>) {
        for c in token.chars() {
            match self.char_bytes.get(&c) {
                Some(&b) => out.push(b),
                None => out.extend(c.to_string().as_bytes()),
            }
        }
    }

    /// Splits one pre-tokenized word (already byte-level encoded) into merged symbols.
    pub fn merge(&self, word: &str) -> Vec<String> {
        let mut symbols: Vec<String> = word.chars().map(String::from).collect();
        loop {
            let best = symbols
                .windows(2)
                .enumerate()
                .filter_map(|(i, p)| self.ranks.get(&(p[0].clone(), p[1].clone())).map(|&r| (r, i)))
                .min();
            let Some((_, i)) = best else { break };
            let right = symbols.remove(i + 1);
            symbols[i].push_str(&right);
        }
        symbols
    }
}
