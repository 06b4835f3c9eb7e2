//! Our logits against llama.cpp's on real weights.
//!
//! Fixtures under tests/fixtures/ come from scripts/llamacpp-reference.py (llama-cpp-python
//! 0.3.36, f16 KV cache, one 128-token batch; the exact command is in each file's `command`).
//! They hold llama.cpp's token ids for a WikiText-2 passage and, per position, its top-20 logits.
//! We run the same ids through our model (f32, unquantized cache) and check our tokenizer
//! against llama.cpp's ids for the whole passage.
//!
//! Two references per model, because llama.cpp's CPU matmuls quantize activations to 8 bits
//! (Q8_0/Q8_K, step max|x|/127 per block) whenever the weights are quantized:
//! - `llamacpp-f32-*.json`: llama.cpp on the same weight values dequantized to F32, so no
//!   activation rounding. What remains is its f16 KV cache, into whose products it also rounds
//!   q and the attention probabilities: relative 2^-11 at about [`F16_ROUNDINGS_PER_LAYER`]
//!   points per layer. Top-1 agreement must be at least [`MIN_TOP1_AGREEMENT`].
//! - `llamacpp-*.json`: llama.cpp on the GGUF as stored. 8-bit rounding is a relative error up
//!   to 2^-8 at the input of each of [`Q8_MATMULS_PER_LAYER`] matmuls per layer. Greedy picks
//!   may then flip where two tokens are nearly tied (llama.cpp disagrees with *itself* between
//!   these two runs at 3 of 128 positions on SmolLM2), so here every disagreement must be a
//!   near-tie: our pick is in llama.cpp's top-20, within the Δ bound of its top-1.
//!
//! Independent relative errors add in quadrature over `n` rounding points, so logits may move by
//! about `rel * sqrt(n)` of their spread (std over the vocabulary); [`SAFETY`] allows for errors
//! that are correlated. Tests for models that are not fetched fail and say to run
//! scripts/fetch-models.sh.

use mlx_rs::{Array, Dtype};
use models::generate::CacheSettings;
use models::load::{load_gguf, Loaded};
use serde::Deserialize;
use std::path::PathBuf;

/// At most 1 of 128 positions may pick a different greedy token.
const MIN_TOP1_AGREEMENT: f64 = 0.99;
/// f16 rounding (11-bit significand), relative.
const F16_REL: f64 = 1.0 / 2048.0;
/// q, k and v (with the attention probabilities) meet the f16 cache in each layer.
const F16_ROUNDINGS_PER_LAYER: f64 = 3.0;
/// 8-bit activation rounding, relative.
const Q8_REL: f64 = 1.0 / 256.0;
/// Quantized matmuls per layer on the residual path (q/k/v read the same rounded input; then
/// o_proj, gate/up, down).
const Q8_MATMULS_PER_LAYER: f64 = 4.0;
/// Headroom over the independent-error estimate.
const SAFETY: f64 = 3.0;

#[derive(Deserialize)]
struct Fixture {
    command: String,
    model_file: String,
    text: String,
    text_ids: Vec<u32>,
    ids: Vec<u32>,
    vocab_size: usize,
    top_ids: Vec<Vec<usize>>,
    top_logits: Vec<Vec<f32>>,
    std: Vec<f32>,
}

fn fixture(name: &str) -> Fixture {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn load(file: &str) -> Loaded {
    let p = test_support::assets::model(file);
    load_gguf(&p, Dtype::Float32).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// How the reference was computed, and so how far it may be from us.
#[derive(Clone, Copy)]
enum Reference {
    DequantizedF32,
    AsStored,
}

impl Reference {
    /// Expected bound on mean |Δlogit| for a model of `n_layers` with logit spread `spread`.
    fn bound(self, n_layers: usize, spread: f64) -> f64 {
        let (rel, per_layer) = match self {
            Reference::DequantizedF32 => (F16_REL, F16_ROUNDINGS_PER_LAYER),
            Reference::AsStored => (Q8_REL, Q8_MATMULS_PER_LAYER),
        };
        SAFETY * rel * (per_layer * n_layers as f64).sqrt() * spread
    }
}

struct Mismatch {
    pos: usize,
    /// Our pick's rank in llama.cpp's top-20 (0 = its top-1), if there.
    rank: Option<usize>,
    /// llama.cpp's logit gap between its top-1 and our pick.
    gap: f32,
}

struct Agreement {
    top1: f64,
    mean_abs_delta: f64,
    bound: f64,
    mismatches: Vec<Mismatch>,
    token_mismatches: usize,
}

/// Our logits `[(L - from) * V]` for positions `from..` of `ids`. The first `from` tokens are
/// prefilled without their logits, so the large output head runs only where we compare.
fn our_logits(loaded: &Loaded, ids: &[u32], from: usize) -> Vec<f32> {
    let model = loaded.model.as_ref();
    // Default settings: an unquantized cache, sliding-window layers get their rotating cache.
    let mut caches = CacheSettings::default().build(model, ids.len()).unwrap();
    let run = |part: &[u32], caches: &mut [mlx_kv::KvCache], last_only: bool| {
        let x = Array::from_slice(part, &[1, part.len() as i32]).as_dtype(Dtype::Int32).unwrap();
        let y = model.forward(&x, caches, last_only).unwrap().as_dtype(Dtype::Float32).unwrap();
        y.eval().unwrap();
        y
    };
    if from > 0 {
        run(&ids[..from], &mut caches, true);
    }
    let logits = run(&ids[from..], &mut caches, false);
    assert_eq!(logits.shape()[..2], [1, (ids.len() - from) as i32]);
    logits.as_slice::<f32>().to_vec()
}

/// Compares positions `from..` with the fixture's; `all` holds our logits from `from` on.
fn compare(fx: &Fixture, fixture_name: &str, loaded: &Loaded, all: &[f32], from: usize, reference: Reference) -> Agreement {

    // Tokenizer: the same ids as llama.cpp for the whole passage.
    let ours = loaded.tokenizer.encode(&fx.text, true);
    let token_mismatches = ours.iter().zip(&fx.text_ids).filter(|(a, b)| a != b).count() + ours.len().abs_diff(fx.text_ids.len());
    if let Some(i) = ours.iter().zip(&fx.text_ids).position(|(a, b)| a != b) {
        let end = |v: &[u32]| (i + 5).min(v.len());
        eprintln!("{}: tokenizer differs from llama.cpp first at {i}: ours {:?} vs {:?}", fx.model_file, &ours[i..end(&ours)], &fx.text_ids[i..end(&fx.text_ids)]);
    }

    let v = fx.vocab_size;
    assert_eq!(all.len(), (fx.ids.len() - from) * v, "{fixture_name}: vocabulary size differs from llama.cpp's");

    let (mut delta_sum, mut delta_n, mut mismatches) = (0f64, 0usize, Vec::new());
    for (pos, (top, vals)) in fx.top_ids.iter().zip(&fx.top_logits).enumerate().skip(from) {
        let row = &all[(pos - from) * v..(pos - from + 1) * v];
        let ours_top = row.iter().enumerate().fold(0, |b, (i, x)| if *x > row[b] { i } else { b });
        if ours_top != top[0] {
            let rank = top.iter().position(|&i| i == ours_top);
            let gap = rank.map_or(f32::INFINITY, |r| vals[0] - vals[r]);
            mismatches.push(Mismatch { pos, rank, gap });
        }
        for (&id, &want) in top.iter().zip(vals) {
            delta_sum += (row[id] - want).abs() as f64;
            delta_n += 1;
        }
    }
    let spread = fx.std[from..].iter().map(|&s| s as f64).sum::<f64>() / (fx.std.len() - from) as f64;
    let n = fx.ids.len() - from;
    let a = Agreement {
        top1: (n - mismatches.len()) as f64 / n as f64,
        mean_abs_delta: delta_sum / delta_n as f64,
        bound: reference.bound(loaded.model.n_layers(), spread),
        mismatches,
        token_mismatches,
    };
    eprintln!(
        "{fixture_name} from position {from}: top-1 agreement {:.4} ({}/{n}), mean |Δlogit| over llama.cpp's top-20 {:.4} (bound {:.4}, mean logit std {spread:.3}), tokenizer mismatches {} of {}\n  reference: {}",
        a.top1,
        n - a.mismatches.len(),
        a.mean_abs_delta,
        a.bound,
        a.token_mismatches,
        fx.text_ids.len(),
        fx.command
    );
    for m in &a.mismatches {
        eprintln!("  pos {}: our pick is llama.cpp's {}, {:.3} below its top-1", m.pos, m.rank.map_or("rank >20".into(), |r| format!("#{}", r + 1)), m.gap);
    }
    a
}

fn check(model: &str) {
    let (exact_name, stored_name) = (format!("llamacpp-f32-{model}.json"), format!("llamacpp-{model}.json"));
    let (exact_fx, stored_fx) = (fixture(&exact_name), fixture(&stored_name));
    assert_eq!(exact_fx.ids, stored_fx.ids, "{model}: the two references tokenized differently");
    let loaded = load(&stored_fx.model_file);
    let logits = our_logits(&loaded, &stored_fx.ids, 0);

    let exact = compare(&exact_fx, &exact_name, &loaded, &logits, 0, Reference::DequantizedF32);
    assert_eq!(exact.token_mismatches, 0, "{model}: our tokenizer disagrees with llama.cpp");
    assert!(exact.top1 >= MIN_TOP1_AGREEMENT, "{model} vs llama.cpp (F32 weights): top-1 agreement {:.4} < {MIN_TOP1_AGREEMENT}", exact.top1);
    assert!(exact.mean_abs_delta <= exact.bound, "{model} vs llama.cpp (F32 weights): mean |Δlogit| {:.4} > {:.4}", exact.mean_abs_delta, exact.bound);

    let stored = compare(&stored_fx, &stored_name, &loaded, &logits, 0, Reference::AsStored);
    assert!(stored.mean_abs_delta <= stored.bound, "{model} vs llama.cpp: mean |Δlogit| {:.4} > {:.4}", stored.mean_abs_delta, stored.bound);
    for m in &stored.mismatches {
        assert!(
            (m.gap as f64) <= stored.bound,
            "{model} vs llama.cpp: position {} disagrees beyond a near-tie (our pick's rank {:?}, gap {:.3}, bound {:.3})",
            m.pos,
            m.rank.map(|r| r + 1),
            m.gap,
            stored.bound
        );
    }
}

#[test]
fn smollm2_135m_matches_llamacpp() {
    check("smollm2-135m");
}

#[test]
fn qwen2_5_coder_0_5b_matches_llamacpp() {
    check("qwen2.5-coder-0.5b");
}

#[test]
fn gemma3_270m_matches_llamacpp() {
    check("gemma3-270m");
}

/// 640 tokens, so the last 128 positions need Gemma's 512-token sliding window (llama.cpp's
/// standard SWA: a query sees keys less than 512 positions back) on 15 of its 18 layers.
#[test]
fn gemma3_270m_past_the_sliding_window_matches_llamacpp() {
    let name = "llamacpp-f32-gemma3-270m-640.json";
    let fx = fixture(name);
    let loaded = load(&fx.model_file);
    let window = loaded.model.layer_window(0).expect("layer 0 of Gemma 3 is a sliding-window layer");
    assert!(fx.ids.len() > window, "the fixture must be longer than the window");
    let logits = our_logits(&loaded, &fx.ids, window);
    let a = compare(&fx, name, &loaded, &logits, window, Reference::DequantizedF32);
    assert_eq!(a.token_mismatches, 0, "gemma3: our tokenizer disagrees with llama.cpp");
    assert!(a.top1 >= MIN_TOP1_AGREEMENT, "gemma3 past the window: top-1 agreement {:.4} < {MIN_TOP1_AGREEMENT}", a.top1);
    assert!(a.mean_abs_delta <= a.bound, "gemma3 past the window: mean |Δlogit| {:.4} > {:.4}", a.mean_abs_delta, a.bound);
}
