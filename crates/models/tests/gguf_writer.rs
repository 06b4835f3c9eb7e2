//! `GgufWriter` output read back through `GgufFile` (here rather than in writer.rs, whose module
//! the reader's module must not be reached from: the crate keeps no import circles).

use models::gguf::{quantize_q4_0, GgmlType, GgufFile, GgufWriter, MetaArray, MetaValue};

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn every_value_type_and_tensor_reads_back() {
    let dir = std::env::temp_dir().join(format!("kvsplit-gguf-writer-round-trip-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("m.gguf");
    let nested = MetaValue::Array(MetaArray::Array(vec![MetaArray::Bool(vec![true, false]), MetaArray::U8(vec![9])]));
    let mut w = GgufWriter::new();
    w.add_string("s", "héllo").add_u32("u", 7).add_i32("i", -7).add_u64("big", 1 << 40).add_f32("f", 0.5);
    w.add_bool("b", true).add_u32("general.alignment", 64);
    w.add_string_array("sa", vec!["a".into(), String::new()]).add_f32_array("fa", vec![1.5, -2.0]);
    w.add_i32_array("ia", vec![3, -4]);
    w.add("nested", nested.clone());
    w.add_tensor("a", &[3], GgmlType::F32).add_tensor("q", &[64, 2], GgmlType::Q4_0);
    let q = quantize_q4_0(&(0..128).map(|i| i as f32 - 64.0).collect::<Vec<_>>()).unwrap();
    w.write(&path, |i, _, out| out.write_all(&if i == 0 { f32_bytes(&[1.0, 2.0, 3.0]) } else { q.clone() })).unwrap();

    let g = GgufFile::open(&path).unwrap();
    assert_eq!(g.version(), 3);
    let read: Vec<(String, MetaValue)> = g.metadata().map(|(k, v)| (k.to_string(), v.clone())).collect();
    let want = vec![
        ("s", MetaValue::String("héllo".into())),
        ("u", MetaValue::U32(7)),
        ("i", MetaValue::I32(-7)),
        ("big", MetaValue::U64(1 << 40)),
        ("f", MetaValue::F32(0.5)),
        ("b", MetaValue::Bool(true)),
        ("general.alignment", MetaValue::U32(64)),
        ("sa", MetaValue::Array(MetaArray::String(vec!["a".into(), String::new()]))),
        ("fa", MetaValue::Array(MetaArray::F32(vec![1.5, -2.0]))),
        ("ia", MetaValue::Array(MetaArray::I32(vec![3, -4]))),
        ("nested", nested),
    ];
    assert_eq!(read, want.into_iter().map(|(k, v)| (k.to_string(), v)).collect::<Vec<_>>());
    assert_eq!((g.alignment(), g.data_offset() % 64), (64, 0));
    let t = g.tensor("q").unwrap();
    assert_eq!((t.shape(), t.ggml_type, t.offset), (vec![2, 64], GgmlType::Q4_0, 64));
    assert_eq!(g.tensor_bytes(t), &q[..]);
    assert_eq!(g.dequantize("a").unwrap(), vec![1.0, 2.0, 3.0]);
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "temporary file left behind");
    std::fs::remove_dir_all(&dir).unwrap();
}
