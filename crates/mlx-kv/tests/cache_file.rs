//! Saved caches: a loaded cache holds the same bytes as the one saved, so attention over it and
//! every later step are bit-identical (no tolerance: nothing is requantized). Files made for
//! another model or setting, and damaged files, fail with a message instead of a panic.

mod common;

use common::*;
use mlx_kv::cache_file::{self, CacheMeta, Expected};
use mlx_kv::{CacheOptions, KeyLayout, KvCache, KvSpec, LayerOverrides, Rotation};
use mlx_rs::Dtype;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const D: usize = 64;
const LAYERS: usize = 3;
const SCALE: f32 = 0.125; // 1/sqrt(64)
/// Tokens fed before saving, in chunks as a prefill would feed them, then single decode tokens.
const CHUNKS: [usize; 4] = [37, 40, 1, 1];

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("kvsplit-cache-file-{}-{name}.safetensors", std::process::id()))
}

/// Three layers of `spec` with `layers` overrides, fed `CHUNKS` of random tokens (per layer a
/// different seed). Returns the caches and the random inputs for one more token per layer.
fn filled(spec: &KvSpec, layers: &LayerOverrides, seed: u64) -> (Vec<KvCache>, Vec<[Host; 3]>) {
    let t: usize = CHUNKS.iter().sum();
    let mut caches = Vec::new();
    let mut next = Vec::new();
    for i in 0..LAYERS {
        let s = seed + 10 * i as u64;
        let (q, k, v) = (Host::random([1, 4, t + 1, D], s), Host::random([1, 2, t + 1, D], s + 1), Host::random([1, 2, t + 1, D], s + 2));
        let mut cache = KvCache::new(layers.apply(spec, i, LAYERS), D, CacheOptions::default()).unwrap();
        let mut at = 0;
        for n in CHUNKS {
            let (a, z) = (at, at + n);
            let out = cache.update_and_attend(&q.tokens(a, z).array(), &k.tokens(a, z).array(), &v.tokens(a, z).array(), SCALE, None).unwrap();
            out.eval().unwrap();
            at = z;
        }
        next.push([q.tokens(t, t + 1), k.tokens(t, t + 1), v.tokens(t, t + 1)]);
        caches.push(cache);
    }
    (caches, next)
}

fn meta(spec: &KvSpec, layers: &LayerOverrides) -> CacheMeta {
    CacheMeta {
        model_id: "model-a-1234".into(),
        model_name: "A.gguf".into(),
        spec: spec.clone(),
        layers: layers.clone(),
        head_dim: D,
        n_layers: LAYERS,
        float_dtype: Dtype::Float32,
        tokens: (0..CHUNKS.iter().sum::<usize>() as u32).map(|i| i * 7 % 1000).collect(),
    }
}

fn expected<'a>(m: &'a CacheMeta) -> Expected<'a> {
    Expected {
        model_id: &m.model_id,
        model_name: &m.model_name,
        setting: Some((&m.spec, &m.layers)),
        head_dim: m.head_dim,
        n_layers: m.n_layers,
        float_dtype: m.float_dtype,
    }
}

fn bits_of(a: &mlx_rs::Array) -> Vec<u32> {
    to_vec(a).iter().map(|x| x.to_bits()).collect()
}

fn specs() -> Vec<(KvSpec, LayerOverrides)> {
    let none = LayerOverrides::default();
    let mut with_tail = KvSpec::bits(8, 4);
    with_tail.residual = 16;
    with_tail.sinks = 4;
    let mut per_channel = KvSpec::bits(4, 4);
    per_channel.k.group = 32;
    per_channel.key_layout = KeyLayout::PerChannel;
    per_channel.residual = 32;
    let mut rotated = KvSpec::bits(4, 2);
    rotated.rotation = Rotation::KeysAndValues;
    let mut late = KvSpec::bits(4, 4);
    late.quantized_kv_start = 50;
    let mut centered = KvSpec::bits(4, 4);
    centered.key_layout = KeyLayout::Centered;
    centered.rotation = Rotation::Keys;
    vec![
        (KvSpec::dense(), none.clone()),
        (KvSpec::bits(8, 4), none.clone()),
        (KvSpec::bits(4, 4), LayerOverrides::parse("first:1=fp16;last:1=8,8").unwrap()),
        (with_tail, none.clone()),
        (per_channel, none.clone()),
        (rotated, none.clone()),
        (centered, none.clone()),
        (late, none),
    ]
}

#[test]
fn a_loaded_cache_continues_bit_identically() {
    for (i, (spec, layers)) in specs().into_iter().enumerate() {
        let (mut saved, next) = filled(&spec, &layers, 100 + i as u64);
        let m = meta(&spec, &layers);
        let path = tmp(&format!("roundtrip-{i}"));
        cache_file::save(&path, &saved, &m).unwrap();
        let (got, mut loaded) = cache_file::load(&path, &expected(&m)).unwrap();
        std::fs::remove_file(&path).ok();
        assert_eq!(got, m, "{spec}: metadata did not round-trip");
        for (l, (a, b)) in saved.iter_mut().zip(loaded.iter_mut()).enumerate() {
            let what = format!("{spec} ({}) layer {l}", layers);
            assert_eq!(b.spec().to_string(), a.spec().to_string(), "{what}");
            let mut want_bytes = a.bytes();
            if spec.quantized_kv_start > 0 {
                // The saved cache's tail emptied once quantization started but keeps its buffer
                // (one step of 256 f32 slots, 2 heads of 64) for reuse; a loaded one never had it.
                let kept = 256 * 2 * D * 4;
                assert_eq!((want_bytes.k_float, want_bytes.v_float), (kept, kept), "{what}");
                (want_bytes.k_float, want_bytes.v_float) = (0, 0);
            }
            if spec.key_layout == KeyLayout::PerChannel {
                // A per-channel decode step reserves its tail's whole group (residual plus one key
                // group of f16 rows, 2 heads of 64) so that every token of the group is written in
                // place; a loaded tail holds only its tokens until its next step.
                let room = (spec.residual + spec.k.group) * 2 * D * 2;
                assert_eq!((want_bytes.k_float, want_bytes.v_float), (room, room), "{what}");
                let got = b.bytes();
                assert!(got.k_float <= room && got.v_float <= room, "{what}: loaded tail {got:?}");
                (want_bytes.k_float, want_bytes.v_float) = (got.k_float, got.v_float);
            }
            assert_eq!((b.offset(), b.len(), b.bytes()), (a.offset(), a.len(), want_bytes), "{what}: offset, length or bytes differ");
            let [q, k, v] = &next[l];
            let out_a = a.update_and_attend(&q.array(), &k.array(), &v.array(), SCALE, None).unwrap();
            let out_b = b.update_and_attend(&q.array(), &k.array(), &v.array(), SCALE, None).unwrap();
            assert_eq!(bits_of(&out_b), bits_of(&out_a), "{what}: the next token's attention differs");
            let keys = |c: &KvCache| bits_of(&c.dequantized_keys().unwrap().unwrap());
            let values = |c: &KvCache| bits_of(&c.dequantized_values().unwrap().unwrap());
            assert_eq!(keys(b), keys(a), "{what}: keys differ after the step");
            assert_eq!(values(b), values(a), "{what}: values differ after the step");
        }
    }
}

#[test]
fn the_file_holds_only_the_live_tokens() {
    // 8-bit K and 4-bit V at group 64, 2 KV heads, 79 tokens: 79*2*(64*8/32*4 + 2*2) bytes of K
    // plus 79*2*(64*4/32*4 + 2*2) of V per layer; the cache itself holds 256 slots each.
    let spec = KvSpec::bits(8, 4);
    let none = LayerOverrides::default();
    let (caches, _) = filled(&spec, &none, 7);
    let path = tmp("size");
    cache_file::save(&path, &caches, &meta(&spec, &none)).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).ok();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t: usize = CHUNKS.iter().sum();
    let data: usize = st.tensors().iter().map(|(_, v)| v.data().len()).sum();
    let per_layer = t * 2 * ((64 * 8 / 32 * 4 + 2 * 2) + (64 * 4 / 32 * 4 + 2 * 2));
    assert_eq!(data, LAYERS * per_layer + t * 4, "tensor bytes: layers plus the u32 token ids");
}

fn saved_file(name: &str) -> (PathBuf, CacheMeta) {
    let spec = KvSpec::bits(8, 4);
    let none = LayerOverrides::default();
    let (caches, _) = filled(&spec, &none, 3);
    let m = meta(&spec, &none);
    let path = tmp(name);
    cache_file::save(&path, &caches, &m).unwrap();
    (path, m)
}

fn load_err(path: &Path, want: &Expected) -> String {
    match cache_file::load(path, want) {
        Ok(_) => panic!("loading {} should fail", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn mismatches_name_both_sides() {
    let (path, m) = saved_file("mismatch");
    let mut want = expected(&m);
    want.model_id = "model-b-5678";
    want.model_name = "B.gguf";
    let e = load_err(&path, &want);
    assert!(e.contains("A.gguf") && e.contains("model-a-1234") && e.contains("B.gguf") && e.contains("model-b-5678") && e.contains("k8v4"), "{e}");

    let k4v4 = KvSpec::bits(4, 4);
    let none = LayerOverrides::default();
    let mut want = expected(&m);
    want.setting = Some((&k4v4, &none));
    let e = load_err(&path, &want);
    assert!(e.contains("k8v4") && e.contains("k4v4") && e.contains("--kv"), "{e}");

    let overrides = LayerOverrides::parse("0=8,8").unwrap();
    let mut want = expected(&m);
    want.setting = Some((&m.spec, &overrides));
    assert!(load_err(&path, &want).contains("--kv-layers 0=8,8"));

    let mut want = expected(&m);
    want.head_dim = 128;
    let e = load_err(&path, &want);
    assert!(e.contains("head_dim 64") && e.contains("head_dim 128"), "{e}");

    let mut want = expected(&m);
    want.n_layers = 4;
    let e = load_err(&path, &want);
    assert!(e.contains("3 layers") && e.contains("4 layers"), "{e}");

    let mut want = expected(&m);
    want.float_dtype = Dtype::Float16;
    let e = load_err(&path, &want);
    assert!(e.contains("float32") && e.contains("float16"), "{e}");

    // Taking the file's setting loads it whatever the run's flags would have been.
    let mut want = expected(&m);
    want.setting = None;
    assert_eq!(cache_file::load(&path, &want).unwrap().0, m);
    std::fs::remove_file(&path).ok();
}

/// Rewrites a saved file with `edit` applied to its metadata and tensors.
fn rewrite(path: &Path, edit: impl FnOnce(&mut HashMap<String, String>, &mut Vec<(String, safetensors::tensor::TensorView)>)) {
    let bytes = std::fs::read(path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut md = header.metadata().clone().unwrap();
    let mut tensors = st.tensors();
    edit(&mut md, &mut tensors);
    let out = safetensors::serialize(tensors, Some(md)).unwrap();
    std::fs::write(path, out).unwrap();
}

#[test]
fn damaged_files_fail_with_a_message() {
    let (path, m) = saved_file("damaged");
    let want = expected(&m);
    let whole = std::fs::read(&path).unwrap();

    std::fs::write(&path, &whole[..whole.len() - 100]).unwrap();
    let e = load_err(&path, &want);
    assert!(e.contains(&path.display().to_string()) && e.contains("not a valid safetensors"), "{e}");

    std::fs::write(&path, &whole[..5]).unwrap();
    assert!(load_err(&path, &want).contains("not a valid safetensors"));

    std::fs::write(&path, b"").unwrap();
    assert!(load_err(&path, &want).contains("not a valid safetensors"));

    std::fs::write(&path, &whole).unwrap();
    rewrite(&path, |md, _| {
        md.insert("format_version".into(), "99".into());
    });
    let e = load_err(&path, &want);
    assert!(e.contains("format version 99") && e.contains("version 1"), "{e}");

    std::fs::write(&path, &whole).unwrap();
    rewrite(&path, |md, _| {
        md.remove("format");
    });
    assert!(load_err(&path, &want).contains("not a saved KV cache"));

    std::fs::write(&path, &whole).unwrap();
    rewrite(&path, |md, _| {
        md.insert("kv_spec".into(), "k8v4-x".into());
    });
    assert!(load_err(&path, &want).contains("'k8v4-x'"));

    // A tensor of the wrong width: named, never handed to a kernel.
    std::fs::write(&path, &whole).unwrap();
    rewrite(&path, |_, tensors| {
        let i = tensors.iter().position(|(n, _)| n == "layers.1.body_v.w").unwrap();
        let v = &tensors[i].1;
        let mut shape = v.shape().to_vec();
        shape[3] /= 2;
        // Leaked: the new view must outlive `rewrite`'s borrow of the file's bytes.
        let data: &'static [u8] = Box::leak(v.data()[..v.data().len() / 2].to_vec().into_boxed_slice());
        tensors[i].1 = safetensors::tensor::TensorView::new(v.dtype(), shape, data).unwrap();
    });
    let e = load_err(&path, &want);
    assert!(e.contains("layer 1") && e.contains("body_v.w"), "{e}");

    // A missing layer tensor leaves K and V with different token counts.
    std::fs::write(&path, &whole).unwrap();
    rewrite(&path, |_, tensors| tensors.retain(|(n, _)| !n.starts_with("layers.2.body_v")));
    let e = load_err(&path, &want);
    assert!(e.contains("layer 2") && e.contains("different token counts"), "{e}");

    std::fs::write(&path, &whole).unwrap();
    rewrite(&path, |md, _| {
        md.insert("tokens".into(), "5".into());
    });
    assert!(load_err(&path, &want).contains("token_ids"));

    std::fs::remove_file(&path).ok();
}

#[test]
fn rotating_caches_are_refused_naming_the_flag() {
    let spec = KvSpec::bits(8, 4);
    let opts = CacheOptions { max_size: Some(64), max_chunk: 64 };
    let mut cache = KvCache::new(spec.clone(), D, opts).unwrap();
    let k = Host::random([1, 2, 8, D], 1).array();
    cache.update(&k, &k).unwrap();
    let mut m = meta(&spec, &LayerOverrides::default());
    m.n_layers = 1;
    m.tokens.truncate(8);
    let e = cache_file::save(&tmp("ring"), &[cache], &m).unwrap_err().to_string();
    assert!(e.contains("--max-kv-size"), "{e}");
}
