//! Incremental detokenization: text comes out only as complete UTF-8, so a character split
//! across tokens (common for emoji and CJK in byte-level vocabularies) is never printed broken.

/// What the decoder needs of a tokenizer: the bytes a token stands for.
pub trait TokenBytes {
    /// Appends the bytes of token `id` to `out`.
    fn token_bytes(&self, id: u32, out: &mut Vec<u8>);
}

/// Feeds generated ids one at a time and returns the text that became complete.
pub struct StreamDecoder<'a> {
    tokenizer: &'a dyn TokenBytes,
    pending: Vec<u8>,
    strip_leading_space: bool,
}

impl<'a> StreamDecoder<'a> {
    pub(crate) fn new(tokenizer: &'a dyn TokenBytes, strip_leading_space: bool) -> Self {
        Self { tokenizer, pending: Vec::new(), strip_leading_space }
    }

    /// Adds one id; returns the newly complete text (possibly empty).
    pub fn push(&mut self, id: u32) -> String {
        self.tokenizer.token_bytes(id, &mut self.pending);
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            // An incomplete sequence at the end waits for the next token; an invalid one in the
            // middle is emitted (as U+FFFD) so it cannot block the stream forever.
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => self.pending.len(),
        };
        let out: Vec<u8> = self.pending.drain(..valid).collect();
        self.emit(&out)
    }

    /// Flushes what is left (an incomplete character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let out = std::mem::take(&mut self.pending);
        self.emit(&out)
    }

    fn emit(&mut self, bytes: &[u8]) -> String {
        let mut s = String::from_utf8_lossy(bytes).into_owned();
        if self.strip_leading_space && !s.is_empty() {
            if s.starts_with(' ') {
                s.remove(0);
            }
            self.strip_leading_space = false;
        }
        s
    }
}
