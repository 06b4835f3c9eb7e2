//! The `Sequence` operations the server builds on, on real weights (the default SmolLM2-135M
//! Q4_1 model, float32): token log-probabilities (`generate_scored`) against a host-side
//! log-softmax of one full pass, and copying a prefix out of a kept conversation (`fork`).

use mlx_kv::KvSpec;
use mlx_rs::{Array, Dtype};
use models::engine::{Engine, TokenLogprobs};
use models::generate::CacheSettings;
use models::load::load;
use models::sample::SamplerSettings;

/// Decode through the cache against one full float32 pass: summation order only (~1e-6
/// relative over 30 layers); the same room the perplexity test's one-pass check uses.
const LOGPROB_TOL: f32 = 2e-3;

fn model() -> Engine {
    Engine::from_loaded(load(&test_support::assets::default_model(), Dtype::Float32).unwrap())
}

fn settings(spec: KvSpec) -> CacheSettings {
    CacheSettings { spec, ..Default::default() }
}

/// Host log-softmax of each row of `[1, L, V]` logits.
fn log_softmax_rows(logits: &Array) -> Vec<Vec<f32>> {
    let logits = logits.as_dtype(Dtype::Float32).unwrap();
    logits.eval().unwrap();
    let v = logits.shape()[2] as usize;
    logits
        .as_slice::<f32>()
        .chunks(v)
        .map(|row| {
            let max = row.iter().copied().fold(f32::MIN, f32::max);
            let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f32>().ln();
            row.iter().map(|x| x - lse).collect()
        })
        .collect()
}

#[test]
fn token_logprobs_match_a_one_pass_log_softmax_and_greedy_picks_the_top_one() {
    let e = model();
    let tok = e.tokenizer().unwrap();
    let prompt = tok.encode("The capital of France is", true);
    let mut seq = e.sequence(&settings(KvSpec::dense()), SamplerSettings::default(), 512).unwrap();
    let mut got: Vec<(u32, TokenLogprobs)> = Vec::new();
    seq.generate_scored(&prompt, 8, &[], Some(5), |id, s| {
        got.push((id, s.expect("scores were asked for")));
        true
    })
    .unwrap();
    assert_eq!(got.len(), 8);

    let all: Vec<u32> = prompt.iter().copied().chain(got.iter().map(|g| g.0)).collect();
    let mut one = e.sequence(&settings(KvSpec::dense()), SamplerSettings::default(), 512).unwrap();
    let rows = log_softmax_rows(&one.forward(&all[..all.len() - 1], false).unwrap());
    for (i, (id, s)) in got.iter().enumerate() {
        let row = &rows[prompt.len() - 1 + i];
        assert!((s.logprob - row[*id as usize]).abs() <= LOGPROB_TOL, "token {i}: {} vs one pass {}", s.logprob, row[*id as usize]);
        assert_eq!(s.top.len(), 5);
        assert!(s.top.windows(2).all(|w| w[0].1 >= w[1].1), "top not sorted: {:?}", s.top);
        // Greedy: the chosen token is the most likely one, with the same score.
        assert_eq!(s.top[0], (*id, s.logprob), "token {i}");
        let mut best: Vec<(usize, f32)> = row.iter().copied().enumerate().collect();
        best.sort_by(|a, b| b.1.total_cmp(&a.1));
        for (k, &(t, lp)) in s.top.iter().enumerate() {
            assert!((lp - row[t as usize]).abs() <= LOGPROB_TOL, "token {i} alternative {k}: {lp} vs {}", row[t as usize]);
            assert!((lp - best[k].1).abs() <= LOGPROB_TOL, "token {i}: alternative {k} is {lp}, the {k}th best is {}", best[k].1);
        }
        assert!(s.top.iter().map(|a| a.1.exp()).sum::<f32>() <= 1.0 + 1e-4);
    }

    // No alternatives: the chosen token's score alone; no request: none. Neither changes tokens.
    for k in [Some(0), None] {
        let mut plain = e.sequence(&settings(KvSpec::dense()), SamplerSettings::default(), 512).unwrap();
        let mut ids = Vec::new();
        plain
            .generate_scored(&prompt, 8, &[], k, |id, s| {
                match (k, s) {
                    (Some(_), Some(s)) => {
                        assert!(s.top.is_empty());
                        assert!((s.logprob - got[ids.len()].1.logprob).abs() <= LOGPROB_TOL);
                    }
                    (None, None) => {}
                    (k, s) => panic!("asked {k:?}, got {s:?}"),
                }
                ids.push(id);
                true
            })
            .unwrap();
        assert_eq!(ids, got.iter().map(|g| g.0).collect::<Vec<_>>(), "scores must not change the tokens");
    }
}

#[test]
fn a_forked_prefix_continues_as_the_trimmed_original_and_leaves_it_whole() {
    let e = model();
    let tok = e.tokenizer().unwrap();
    let text = "The history of the city begins with a small settlement on the river. ".repeat(40);
    let tokens = tok.encode(&text, true);
    let spec = KvSpec::bits(8, 4);
    let mut a = e.sequence(&settings(spec), SamplerSettings::default(), 64).unwrap();
    a.prefill(&tokens).unwrap();
    // Caches allocate in steps of 256 tokens: over 512 tokens, a third fits in one step.
    assert!(tokens.len() > 2 * mlx_kv::store::STEP, "{} tokens", tokens.len());
    let (n, full_bytes) = (tokens.len() / 3, a.kv_bytes().total());

    let mut b = a.fork(n, SamplerSettings::default()).unwrap().expect("a per-token k8v4 cache can be cut anywhere");
    assert_eq!(b.cached_tokens(), n);
    assert_eq!(b.history(), &tokens[..n]);
    assert_eq!(a.cached_tokens(), tokens.len(), "the original keeps every token");
    assert_eq!(a.history(), &tokens[..]);
    assert!(b.kv_bytes().total() < full_bytes / 2, "the copy holds {} bytes for {n} of {} tokens ({full_bytes})", b.kv_bytes().total(), tokens.len());

    // The copy and the original cut back to the same prefix hold the same packed tokens, so the
    // same continuation gives the same logits.
    let rest = tok.encode(" Its bridge was built", false);
    let from_copy = log_softmax_rows(&b.forward(&rest, false).unwrap());
    assert!(a.trim_to(n));
    let from_trim = log_softmax_rows(&a.forward(&rest, false).unwrap());
    let worst = from_copy.iter().flatten().zip(from_trim.iter().flatten()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
    assert!(worst <= 1e-4, "copy and trimmed original differ by {worst}");

    // Past the end there is nothing to copy.
    assert!(b.fork(b.cached_tokens() + 1, SamplerSettings::default()).unwrap().is_none());
}
