//! The tokenizer of the default model (SmolLM2, byte-level BPE, pre-tokenizer `smollm`) and the
//! streaming detokenizer.


use models::gguf::GgufFile;
use models::tokenizer::{TokenType, Tokenizer};

fn tokenizer() -> Tokenizer {
    Tokenizer::from_gguf(&GgufFile::open(test_support::assets::default_model()).unwrap()).unwrap()
}

#[test]
fn round_trips_plain_text() {
    let tok = tokenizer();
    let text = "The capital of France is";
    let ids = tok.encode(text, true);
    assert!(!tok.add_bos(), "SmolLM2 adds no BOS");
    assert_eq!(ids.len(), 5, "{ids:?}");
    assert_eq!(tok.decode(&ids), text);
    for text in ["  leading spaces\n\ttabs, digits 12345 and ünïcödé 🦙", "", "x"] {
        assert_eq!(tok.decode(&tok.encode(text, true)), text);
    }
}

#[test]
fn special_tokens_are_single_ids() {
    let tok = tokenizer();
    let im_start = tok.token_id("<|im_start|>").unwrap();
    assert_eq!(tok.token_type(im_start), Some(TokenType::Control));
    let ids = tok.encode("<|im_start|>user", false);
    assert_eq!(ids[0], im_start);
    assert_eq!(ids[1..], tok.encode("user", false)[..]);
    // Without special parsing the marker is plain text.
    assert!(tok.encode_with("<|im_start|>", false, false).len() > 1);
    let im_end = tok.token_id("<|im_end|>").unwrap();
    assert!(tok.is_eos(im_end) && tok.is_eos(tok.token_id("<|endoftext|>").unwrap()));
    assert_eq!(tok.decode(&[im_start]), "", "control tokens are not printed");
    assert!(tok.chat_template().unwrap().contains("<|im_start|>"));
}

#[test]
fn stream_decoder_never_splits_characters() {
    let tok = tokenizer();
    let text = "Hi 🦙🎉 你好世界, naïve café";
    let ids = tok.encode(text, false);
    let mut dec = tok.stream_decoder();
    let mut out = String::new();
    let mut split_chars = 0;
    for &id in &ids {
        let piece = dec.push(id);
        assert!(!piece.contains('\u{FFFD}'), "broken character emitted after id {id}");
        if piece.is_empty() {
            split_chars += 1;
        }
        out.push_str(&piece);
    }
    out.push_str(&dec.finish());
    assert_eq!(out, text);
    assert!(split_chars > 0, "the test text should contain characters split across tokens");
}
