//! GGUF reader: the real SmolLM2 file, hand-built files of every metadata type, and corrupt input.

use std::path::PathBuf;

use models::gguf::{GgmlType, GgufError, GgufFile, MetaArray, MetaValue};
use test_support::gguf_writer::GgufBuilder;

/// The default model, fetched by scripts/setup.sh.
fn model_path() -> PathBuf {
    test_support::assets::default_model()
}

#[test]
fn reads_smollm2_header_and_tensors() {
    let f = GgufFile::open(model_path()).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(f.get_u32("llama.block_count").unwrap(), 30);
    assert_eq!(f.get_u32("llama.embedding_length").unwrap(), 576);
    assert_eq!(f.get_f32("llama.rope.freq_base").unwrap(), 100000.0);
    assert_eq!(f.get_str_array("tokenizer.ggml.tokens").unwrap().len(), 49152);
    assert_eq!(f.get_str("tokenizer.ggml.model").unwrap(), "gpt2");
    assert!(f.optional("no.such.key", GgufFile::get_u32).unwrap().is_none());
    assert!(matches!(f.get_u32("general.architecture"), Err(GgufError::WrongType { .. })));
    assert!(matches!(f.get_str("no.such.key"), Err(GgufError::MissingKey { .. })));

    let emb = f.tensor("token_embd.weight").unwrap();
    assert_eq!(emb.ggml_shape, vec![576, 49152]);
    assert_eq!(emb.shape(), vec![49152, 576]);
    assert_eq!(emb.ggml_type, GgmlType::Q8_0);
    assert_eq!(emb.n_bytes(), 49152 * 576 / 32 * 34);
    assert_eq!(f.tensor("blk.0.attn_q.weight").unwrap().ggml_type, GgmlType::Q4_1);
    assert_eq!(f.tensor("output_norm.weight").unwrap().ggml_type, GgmlType::F32);
    assert!(f.tensor("output.weight").is_err(), "SmolLM2 ties its embeddings");

    // Byte ranges are aligned, inside the data section and do not overlap.
    let mut ranges: Vec<_> = f.tensors().iter().map(|t| t.byte_range.clone()).collect();
    ranges.sort_by_key(|r| r.start);
    assert!(ranges.windows(2).all(|w| w[0].end <= w[1].start));
    assert!(ranges.iter().all(|r| r.start >= f.data_offset() && (r.start - f.data_offset()).is_multiple_of(f.alignment())));
    assert_eq!(f.tensor_bytes(emb).len() as u64, emb.n_bytes());
}

fn every_value() -> Vec<(&'static str, MetaValue)> {
    vec![
        ("u8", MetaValue::U8(7)),
        ("i8", MetaValue::I8(-7)),
        ("u16", MetaValue::U16(700)),
        ("i16", MetaValue::I16(-700)),
        ("u32", MetaValue::U32(70000)),
        ("i32", MetaValue::I32(-70000)),
        ("u64", MetaValue::U64(1 << 40)),
        ("i64", MetaValue::I64(-(1 << 40))),
        ("f32", MetaValue::F32(1.5)),
        ("f64", MetaValue::F64(-2.25)),
        ("bool", MetaValue::Bool(true)),
        ("str", MetaValue::String("héllo".into())),
        ("arr.str", MetaValue::Array(MetaArray::String(vec!["a".into(), "".into(), "ü".into()]))),
        ("arr.f32", MetaValue::Array(MetaArray::F32(vec![1.0, -0.5]))),
        ("arr.i32", MetaValue::Array(MetaArray::I32(vec![1, -2, 3]))),
        (
            "arr.nested",
            MetaValue::Array(MetaArray::Array(vec![
                MetaArray::U8(vec![1, 2]),
                MetaArray::Array(vec![MetaArray::String(vec!["deep".into()])]),
            ])),
        ),
    ]
}

#[test]
fn round_trips_every_value_type_in_v2_and_v3() {
    for version in [2, 3] {
        let mut b = GgufBuilder::new().version(version).alignment(64);
        for (k, v) in every_value() {
            b = b.kv(k, v);
        }
        let b = b.tensor("t", &[32, 2], GgmlType::F32, vec![0; 256]).tensor("u", &[4], GgmlType::F16, vec![0; 8]);
        let f = GgufFile::from_bytes("mem.gguf", b.build()).unwrap();
        assert_eq!(f.version(), version);
        assert_eq!(f.alignment(), 64);
        for (k, v) in every_value() {
            assert_eq!(f.get(k), Some(&v), "{k}");
        }
        assert_eq!(f.get_int_array("arr.i32").unwrap(), vec![1, -2, 3]);
        assert_eq!(f.get_u64("u64").unwrap(), 1 << 40);
        assert_eq!(f.tensor("u").unwrap().byte_range.start % 64, 0);
        assert_eq!(f.tensor("t").unwrap().shape(), vec![2, 32]);
    }
}

fn err_of(bytes: Vec<u8>) -> String {
    GgufFile::from_bytes("bad.gguf", bytes).expect_err("corrupt input must be an error").to_string()
}

#[test]
fn rejects_malformed_files_with_named_errors() {
    let good = GgufBuilder::new().kv("k", MetaValue::U32(1)).tensor("w", &[32], GgmlType::Q8_0, vec![0; 34]).build();
    assert!(GgufFile::from_bytes("ok.gguf", good.clone()).is_ok());

    let mut bad = good.clone();
    bad[0] = b'X';
    assert!(err_of(bad).contains("bad.gguf: not a GGUF file"));
    for v in [1u32, 4, 3u32.swap_bytes()] {
        let mut bad = good.clone();
        bad[4..8].copy_from_slice(&v.to_le_bytes());
        assert!(err_of(bad).contains("unsupported GGUF version"), "{v}");
    }
    assert!(err_of(good[..good.len() - 1].to_vec()).contains("'w' data"));
    assert!(err_of(good[..30].to_vec()).contains("truncated"));
    assert!(err_of(good[..70].to_vec()).contains("truncated while reading tensor info"));

    let unknown = GgufBuilder::new().tensor_raw_type("blk.7.ffn", &[32], 4, vec![0; 32]).build();
    assert!(err_of(unknown).contains("tensor 'blk.7.ffn' has unknown ggml type id 4"));
    let partial = GgufBuilder::new().tensor("p", &[33], GgmlType::Q4_0, vec![0; 18]).build();
    assert!(err_of(partial).contains("not a multiple of the Q4_0 block size"));

    // A count of 2^60 metadata pairs must be refused before anything is allocated.
    let mut absurd = good.clone();
    absurd[16..24].copy_from_slice(&(1u64 << 60).to_le_bytes());
    assert!(err_of(absurd).contains("more than the limit"));
    let huge_dims = GgufBuilder::new().tensor("h", &[1 << 40, 1 << 40], GgmlType::F32, vec![]).build();
    assert!(err_of(huge_dims).contains("'h'"));
}

/// Cuts and scribbles over the real model's bytes at many offsets: every truncation must be an
/// error, every corruption an error or a clean parse, never a panic or a huge allocation.
#[test]
fn truncated_or_corrupted_model_never_panics() {
    let bytes = std::fs::read(model_path()).unwrap();
    let header_end = GgufFile::open(model_path()).unwrap().data_offset() as usize;
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    // Header and metadata (where the parser works hardest), then a few cuts into tensor data.
    let mut cuts: Vec<usize> = (0..64).chain((0..300).map(|_| next() as usize % header_end)).collect();
    cuts.extend((0..6).map(|i| header_end + (bytes.len() - header_end) * i / 6 + 1));
    for cut in cuts {
        assert!(GgufFile::from_bytes("cut.gguf", bytes[..cut].to_vec()).is_err(), "cut at {cut}");
    }
    let mut head = bytes[..header_end].to_vec();
    for _ in 0..300 {
        let at = next() as usize % (header_end - 8);
        let saved: Vec<u8> = head[at..at + 8].to_vec();
        let fill = next().to_le_bytes();
        head[at..at + 8].copy_from_slice(&fill);
        // Without the tensor data every surviving parse still ends in an error.
        let _ = GgufFile::from_bytes("corrupt.gguf", head.clone());
        head[at..at + 8].copy_from_slice(&saved);
    }
}
