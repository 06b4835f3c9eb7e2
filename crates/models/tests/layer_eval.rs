//! `--layer-eval` changes when a prefill chunk is evaluated (layer by layer instead of once per
//! chunk), never what it computes: the same ops on the same inputs give the same bits. Its own
//! test binary, since it installs process-wide options.

use mlx_kv::KvSpec;
use mlx_rs::Dtype;
use models::engine::Engine;
use models::generate::CacheSettings;
use models::sample::SamplerSettings;

fn prefill_logits(layer_eval: mlx_ext::Toggle, spec: &KvSpec) -> Vec<f32> {
    mlx_ext::options::install(mlx_ext::EngineOptions { layer_eval, ..Default::default() }).unwrap();
    let cfg = models::random::preset("tiny").unwrap();
    let w = models::random::weights(&cfg, models::random::RandomWeights::Quant(4), Dtype::Float32, 7).unwrap();
    let vocab = cfg.vocab_size as u32;
    let e = Engine::from_model(Box::new(models::families::llama::Model::new(cfg, w, Dtype::Float32).unwrap()));
    let settings = CacheSettings { spec: spec.clone(), ..Default::default() };
    let mut seq = e.sequence(&settings, SamplerSettings::default(), 512).unwrap();
    // Two chunks: 300 tokens (at least SETTLE_TOKENS, so settled layer by layer when on) over an
    // empty cache, then 40 (never settled) over a packed one.
    let ids: Vec<u32> = (0..340u32).map(|i| (i * 7919 + 13) % vocab).collect();
    seq.prefill(&ids[..300]).unwrap();
    let logits = seq.prefill(&ids[300..]).unwrap().as_dtype(Dtype::Float32).unwrap();
    logits.eval().unwrap();
    logits.as_slice::<f32>().to_vec()
}

#[test]
fn layer_by_layer_prefill_computes_the_same_logits() {
    // The first chunk must be one that settles.
    const { assert!(300 >= models::decoder::SETTLE_TOKENS) };
    for spec in [KvSpec::dense(), KvSpec::bits(8, 4)] {
        let on = prefill_logits(mlx_ext::Toggle::On, &spec);
        let off = prefill_logits(mlx_ext::Toggle::Off, &spec);
        assert!(!on.is_empty() && on.iter().all(|x| x.is_finite()));
        assert_eq!(on, off, "{spec:?}: --layer-eval changed the logits");
    }
}
