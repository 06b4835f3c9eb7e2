//! One request's way out: produced tokens become text pieces (complete UTF-8 only), stop
//! strings are found across token boundaries and held back until decided, log-probabilities
//! travel with the text they belong to, and a closed channel means the client went away.

use crate::api::{Alternative, TokenScore};
use crate::job::Event;
use models::engine::TokenLogprobs;
use models::tokenizer::{StreamDecoder, Tokenizer};
use tokio::sync::mpsc::UnboundedSender;

pub struct Output<'t> {
    tok: &'t Tokenizer,
    events: UnboundedSender<Event>,
    decoder: StreamDecoder<'t>,
    stops: Vec<String>,
    /// Text decided but not yet sent: it could still grow into a stop string.
    pending: String,
    scored: Vec<TokenScore>,
    /// Set when a stop string ended the text.
    pub stopped: bool,
    /// Set when the client is gone (a send failed or the channel closed).
    pub gone: bool,
}

/// How many bytes at the end of `text` could still grow into one of `stops`: they are held back
/// from the stream until the next token decides.
fn held_back(text: &str, stops: &[String]) -> usize {
    let mut keep = 0;
    for s in stops {
        for n in (1..s.len()).rev() {
            if n <= text.len() && text.is_char_boundary(text.len() - n) && s.is_char_boundary(n) && text.ends_with(&s[..n]) {
                keep = keep.max(n);
                break;
            }
        }
    }
    keep
}

impl<'t> Output<'t> {
    pub fn new(tok: &'t Tokenizer, events: UnboundedSender<Event>, stops: Vec<String>) -> Self {
        Output { tok, events, decoder: tok.stream_decoder(), stops, pending: String::new(), scored: Vec::new(), stopped: false, gone: false }
    }

    pub fn tokenizer(&self) -> &'t Tokenizer {
        self.tok
    }

    /// Whether the client is still there to read.
    pub fn connected(&mut self) -> bool {
        if self.events.is_closed() {
            self.gone = true;
        }
        !self.gone
    }

    fn alternative(&self, id: u32, logprob: f32) -> Alternative {
        let mut bytes = Vec::new();
        self.tok.token_bytes(id, &mut bytes);
        if bytes.is_empty() {
            // A control token (end of turn) decodes to nothing; name it as the vocabulary does.
            bytes = self.tok.token(id).unwrap_or("").as_bytes().to_vec();
        }
        Alternative { text: String::from_utf8_lossy(&bytes).into_owned(), bytes, logprob }
    }

    /// Takes one produced token (not an end-of-generation token); false when the text must end
    /// here (a stop string) or nobody is listening.
    pub fn push(&mut self, id: u32, scores: Option<TokenLogprobs>) -> bool {
        if !self.connected() {
            return false;
        }
        self.pending.push_str(&self.decoder.push(id));
        if let Some(s) = scores {
            let top = s.top.iter().map(|&(t, lp)| self.alternative(t, lp)).collect();
            self.scored.push(TokenScore { token: self.alternative(id, s.logprob), top });
        }
        if let Some(pos) = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min() {
            self.pending.truncate(pos);
            self.stopped = true;
            return false;
        }
        let send = self.pending.len() - held_back(&self.pending, &self.stops);
        if send > 0 {
            let piece: String = self.pending.drain(..send).collect();
            if self.events.send(Event::Text(piece, std::mem::take(&mut self.scored))).is_err() {
                self.gone = true;
                return false;
            }
        }
        true
    }

    /// Sends what is held back (the decoder's rest too, unless a stop string cut the text).
    pub fn flush(&mut self) {
        if self.gone {
            return;
        }
        if !self.stopped {
            let rest = self.decoder.finish();
            self.pending.push_str(&rest);
        }
        if !self.pending.is_empty() || !self.scored.is_empty() {
            let _ = self.events.send(Event::Text(std::mem::take(&mut self.pending), std::mem::take(&mut self.scored)));
        }
    }

    pub fn send(&self, event: Event) {
        let _ = self.events.send(event);
    }
}

#[cfg(test)]
mod tests {
    use super::held_back;

    #[test]
    fn text_that_could_begin_a_stop_sequence_is_held_back() {
        let stops = vec!["\nUser:".to_string(), "END".to_string()];
        assert_eq!(held_back("Hello", &stops), 0);
        assert_eq!(held_back("Hello\nUs", &stops), 3);
        assert_eq!(held_back("Hello E", &stops), 1);
        assert_eq!(held_back("Hello EN", &stops), 2);
        assert_eq!(held_back("é", &["éa".to_string()]), 2);
    }
}
