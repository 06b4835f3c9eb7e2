//! SentencePiece BPE (`tokenizer.ggml.model == "llama"`), as llama.cpp runs it from GGUF scores:
//! start from single characters, repeatedly merge the adjacent pair whose concatenation is the
//! vocabulary token with the highest score, then map pieces to ids, falling back to `<0xXX>`
//! byte tokens for pieces outside the vocabulary.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

/// A candidate merge of symbols `left` and `right` (indices into the symbol list).
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    len: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Bigram {
    /// Highest score first; on ties the leftmost pair, as in SentencePiece.
    fn cmp(&self, o: &Self) -> Ordering {
        self.score.total_cmp(&o.score).then_with(|| o.left.cmp(&self.left))
    }
}

struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// Tokenizes `text` (spaces already replaced by "▁") and appends ids to `out`.
pub(crate) fn tokenize(
    text: &str,
    vocab: &HashMap<String, u32>,
    scores: &[f32],
    byte_token: impl Fn(u8) -> Option<u32>,
    unk: Option<u32>,
    out: &mut Vec<u32>,
) {
    let mut syms: Vec<Symbol> = Vec::new();
    for (i, (start, c)) in text.char_indices().enumerate() {
        syms.push(Symbol { start, len: c.len_utf8(), prev: i.checked_sub(1), next: Some(i + 1) });
    }
    let Some(last) = syms.last_mut() else { return };
    last.next = None;

    let mut heap = BinaryHeap::new();
    // Remembers how each merged piece was built, to split pieces the vocab lacks.
    let mut built_from: HashMap<(usize, usize), (usize, usize)> = HashMap::new();
    let try_add = |heap: &mut BinaryHeap<Bigram>, syms: &[Symbol], left: Option<usize>, right: Option<usize>| {
        let (Some(l), Some(r)) = (left, right) else { return };
        let piece = &text[syms[l].start..syms[r].start + syms[r].len];
        if let Some(&id) = vocab.get(piece) {
            let score = scores.get(id as usize).copied().unwrap_or(0.0);
            heap.push(Bigram { score, left: l, right: r, len: piece.len() });
        }
    };
    for i in 1..syms.len() {
        try_add(&mut heap, &syms, Some(i - 1), Some(i));
    }
    while let Some(b) = heap.pop() {
        let (l, r) = (b.left, b.right);
        // Skip stale candidates whose symbols have since been merged into others.
        if syms[l].len == 0 || syms[r].len == 0 || syms[l].len + syms[r].len != b.len {
            continue;
        }
        built_from.insert((syms[l].start, b.len), (syms[l].len, syms[r].len));
        syms[l].len += syms[r].len;
        syms[r].len = 0;
        syms[l].next = syms[r].next;
        if let Some(n) = syms[r].next {
            syms[n].prev = Some(l);
        }
        try_add(&mut heap, &syms, syms[l].prev, Some(l));
        try_add(&mut heap, &syms, Some(l), syms[l].next);
    }
    let mut i = Some(0);
    while let Some(s) = i {
        resegment(text, syms[s].start, syms[s].len, vocab, &built_from, &byte_token, unk, out);
        i = syms[s].next;
    }
}

#[allow(clippy::too_many_arguments)]
fn resegment(
    text: &str,
    start: usize,
    len: usize,
    vocab: &HashMap<String, u32>,
    built_from: &HashMap<(usize, usize), (usize, usize)>,
    byte_token: &impl Fn(u8) -> Option<u32>,
    unk: Option<u32>,
    out: &mut Vec<u32>,
) {
    let piece = &text[start..start + len];
    if let Some(&id) = vocab.get(piece) {
        out.push(id);
    } else if let Some(&(l, r)) = built_from.get(&(start, len)) {
        resegment(text, start, l, vocab, built_from, byte_token, unk, out);
        resegment(text, start + l, r, vocab, built_from, byte_token, unk, out);
    } else {
        for b in piece.bytes() {
            if let Some(id) = byte_token(b).or(unk) {
                out.push(id);
            }
        }
    }
}
