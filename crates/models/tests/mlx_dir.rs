//! GGUF → MLX directory → load, on the default model (SmolLM2-135M-Instruct Q4_1).
//!
//! Carried-over Q4_1/Q8_0 triplets and f32 tensors are lossless, so the directory must give the
//! GGUF model's logits bit for bit; re-quantized weights are held to the bound MLX's affine
//! quantizer guarantees (see [`step_bound`]).

use mlx_rs::ops::dequantize;
use mlx_rs::{Array, Dtype};
use models::generate::{prefill, CacheSettings};
use models::mlx_dir::{self, ConvertOptions, QuantPlan};
use models::load::{load_dir, load_gguf, Loaded};
use models::load::safetensors::{self, QuantSpec};
use models::weights::Weight;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const PROMPT: &str = "The capital of France is";
const GREEDY_TOKENS: usize = 16;
/// MLX's affine quantizer makes zero exact: with `s = (max - min) / n` (n = 2^bits - 1) and
/// `edge` the extreme of larger magnitude (so |edge| >= n s / 2), it stores
/// `scale = edge / round(edge / s)`, a grid anchored at `edge`. Inside the grid the error is at
/// most `scale / 2`; the far end can fall short of the other extreme by at most `s`, and
/// `s <= scale (1 + 1/n)`. So every element is within `scale (1 + 1/n)`.
fn step_bound(bits: i32) -> f32 {
    1.0 + 1.0 / ((1 << bits) - 1) as f32
}
/// f32 rounding of `q * scale + bias` on values of order one.
const F32_SLACK: f32 = 1e-6;

fn model_path() -> PathBuf {
    test_support::assets::default_model()
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kvsplit-mlxfmt-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn opts() -> ConvertOptions {
    ConvertOptions { dtype: None, quantize: None, dequantize: false, max_shard_bytes: 5_000_000_000, force: false }
}

fn convert(out: &Path, o: &ConvertOptions) -> mlx_dir::Report {
    let src = mlx_dir::source_from_gguf(&model_path()).unwrap();
    mlx_dir::write(src, out, o, &mut |_| {}).unwrap()
}

/// The lossless conversion, shared by the tests of this file.
fn converted() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = temp_dir("lossless").join("SmolLM2-mlx");
        convert(&out, &opts());
        out
    })
}

fn gguf_model() -> Loaded {
    load_gguf(&model_path(), Dtype::Float32).unwrap()
}

fn last_logits(m: &Loaded, prompt: &[u32]) -> Vec<f32> {
    let mut caches = CacheSettings::default().build(m.model.as_ref(), 512).unwrap();
    let l = prefill(m.model.as_ref(), &mut caches, prompt, 512).unwrap().as_dtype(Dtype::Float32).unwrap();
    l.as_slice::<f32>().to_vec()
}

fn argmax(v: &[f32]) -> u32 {
    v.iter().enumerate().fold(0, |b, (i, x)| if *x > v[b] { i } else { b }) as u32
}

fn greedy(m: &Loaded, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut caches = CacheSettings::default().build(m.model.as_ref(), 512).unwrap();
    let mut logits = prefill(m.model.as_ref(), &mut caches, prompt, 512).unwrap();
    let mut out = Vec::new();
    for _ in 0..n {
        let l = logits.as_dtype(Dtype::Float32).unwrap();
        let next = argmax(l.as_slice::<f32>());
        out.push(next);
        logits = prefill(m.model.as_ref(), &mut caches, &[next], 1).unwrap();
    }
    out
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn lossless_conversion_gives_identical_logits_and_greedy_tokens() {
    let g = gguf_model();
    let d = load_dir(converted(), Dtype::Float32).unwrap();
    let prompt = g.tokenizer.encode(PROMPT, true);
    assert_eq!(d.tokenizer.encode(PROMPT, true), prompt, "directory tokenizer encodes the prompt differently");
    let (lg, ld) = (last_logits(&g, &prompt), last_logits(&d, &prompt));
    assert_eq!(max_abs_diff(&lg, &ld), 0.0, "logits differ");
    let (tg, td) = (greedy(&g, &prompt, GREEDY_TOKENS), greedy(&d, &prompt, GREEDY_TOKENS));
    assert_eq!(tg, td);
    assert!(d.tokenizer.decode(&td).contains("Paris"), "{:?}", d.tokenizer.decode(&td));
}

#[test]
fn config_records_the_carried_over_quantization() {
    let (cfg, quant) = safetensors::read_config(converted()).unwrap();
    assert_eq!(cfg.num_hidden_layers(), 30);
    let q = quant.expect("a quantized checkpoint has a quantization block");
    assert_eq!(q.default.group, 32);
    assert!([4, 8].contains(&q.default.bits));
    for name in ["tokenizer.json", "tokenizer_config.json", "generation_config.json", "model.safetensors"] {
        assert!(converted().join(name).is_file(), "{name} missing");
    }
}

/// Files 0644, directories 0755: model directories are shared between users.
#[cfg(unix)]
fn assert_normal_permissions(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(dir), 0o755, "{}", dir.display());
    let mut files = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        assert_eq!(mode(&p), 0o644, "{:o} for {}", mode(&p), p.display());
        files += 1;
    }
    assert!(files >= 4, "only {files} files in {}", dir.display());
}

#[cfg(unix)]
#[test]
fn output_files_are_world_readable() {
    assert_normal_permissions(converted());
}

#[test]
fn mixed_bits_keep_embeddings_and_chosen_layers_higher_and_still_generate() {
    let plan = QuantPlan {
        base: QuantSpec { bits: 4, group: 64 },
        mixed: mlx_dir::MixedRecipe::parse("mixed_4_6"),
        embed_bits: Some(8),
    };
    let out = temp_dir("mixed").join("m");
    convert(&out, &ConvertOptions { quantize: Some(plan), ..opts() });
    let (_, quant) = safetensors::read_config(&out).unwrap();
    let quant = quant.expect("quantization block");
    assert_eq!(quant.default, QuantSpec { bits: 4, group: 64 });
    // The block must say what each stored triplet is; the loader checks packed widths against it.
    let (_, mut weights) = safetensors::load_dir(&out, Dtype::Float32).unwrap();
    let names: Vec<String> = weights.names().cloned().collect();
    let mut by_bits: std::collections::BTreeMap<i32, usize> = Default::default();
    for name in names {
        if let Weight::Quant { bits, group, .. } = weights.take(&name).unwrap() {
            let module = name.trim_end_matches(".weight");
            assert_eq!(QuantSpec { bits, group }, plan.spec_for(module, 30), "{module}");
            assert_eq!(quant.for_module(module), Some(QuantSpec { bits, group }), "{module}");
            *by_bits.entry(bits).or_default() += 1;
        }
    }
    // 30 layers x 7 matrices + embedding: 14 layers x (v_proj, down_proj) at 6, embedding at 8.
    assert_eq!(by_bits, [(4, 30 * 7 - 28), (6, 28), (8, 1)].into_iter().collect(), "{by_bits:?}");

    let g = gguf_model();
    let d = load_dir(&out, Dtype::Float32).unwrap();
    let prompt = g.tokenizer.encode(PROMPT, true);
    let (want, got) = (greedy(&g, &prompt, 1), greedy(&d, &prompt, GREEDY_TOKENS));
    assert_eq!(got[0], want[0], "first greedy token: {:?} vs {:?}", d.tokenizer.decode(&got[..1]), g.tokenizer.decode(&want));
    assert!(d.tokenizer.decode(&got).contains("Paris"), "{:?}", d.tokenizer.decode(&got));
    std::fs::remove_dir_all(out.parent().unwrap()).ok();
}

#[test]
fn sharded_output_loads_to_the_same_logits() {
    let out = temp_dir("sharded").join("m");
    let report = convert(&out, &ConvertOptions { max_shard_bytes: 20_000_000, ..opts() });
    assert!(report.shards > 1, "{report:?}");
    assert!(out.join(safetensors::INDEX_FILE).is_file());
    assert!(!out.join(safetensors::SINGLE_FILE).exists());
    #[cfg(unix)]
    assert_normal_permissions(&out);
    for (file, _) in safetensors::shard_files(&out).unwrap() {
        let len = std::fs::metadata(&file).unwrap().len();
        // A shard holds one tensor over the limit, or tensors adding up to at most the limit.
        let n = safetensors::read_safetensors(&file).unwrap().len();
        assert!(n == 1 || len <= 20_000_000 + 100_000, "{} is {len} bytes with {n} tensors", file.display());
    }
    let g = gguf_model();
    let d = load_dir(&out, Dtype::Float32).unwrap();
    let prompt = g.tokenizer.encode(PROMPT, true);
    assert_eq!(max_abs_diff(&last_logits(&g, &prompt), &last_logits(&d, &prompt)), 0.0);
    std::fs::remove_dir_all(out.parent().unwrap()).ok();
}

#[test]
fn requantized_weights_stay_within_the_affine_step_bound() {
    let spec = QuantSpec { bits: 8, group: 64 };
    let out = temp_dir("q8g64").join("m");
    let report = convert(&out, &ConvertOptions { quantize: Some(QuantPlan::uniform(spec)), ..opts() });
    assert!(report.quantized > 0);
    let (_, quant) = safetensors::read_config(&out).unwrap();
    assert_eq!(quant.unwrap().default, spec);
    let (_, mut gguf) = {
        let (c, w, _) = models::load::gguf::load(&model_path(), Dtype::Float32).unwrap();
        (c, w)
    };
    let (_, mut dir) = safetensors::load_dir(&out, Dtype::Float32).unwrap();
    let names: Vec<String> = dir.names().cloned().collect();
    let mut checked = 0;
    for name in names {
        let (Weight::Quant { w, scales, biases, bits, group }, src) = (dir.take(&name).unwrap(), gguf.take(&name).unwrap()) else {
            continue;
        };
        assert_eq!((bits, group), (spec.bits, spec.group), "{name}");
        let src = src.to_dense(Dtype::Float32).unwrap();
        let got = dequantize(&w, &scales, &biases, group, bits).unwrap();
        let err = (got - &src).abs().unwrap();
        let rows = src.shape()[0];
        let bound = scales.reshape(&[rows, -1, 1]).unwrap().abs().unwrap() * Array::from_f32(step_bound(bits));
        let excess = err.reshape(&[rows, -1, group]).unwrap() - bound;
        let worst = excess.max(None).unwrap().item_exact::<f32>();
        assert!(worst <= F32_SLACK, "{name}: error exceeds the step bound by {worst}");
        checked += 1;
    }
    assert!(checked >= 30 * 7, "only {checked} weights were re-quantized");
    std::fs::remove_dir_all(out.parent().unwrap()).ok();
}

#[test]
fn existing_output_is_refused_without_force_and_replaced_with_it() {
    let out = temp_dir("force").join("m");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("marker"), "old").unwrap();
    let src = mlx_dir::source_from_gguf(&model_path()).unwrap();
    let e = mlx_dir::write(src, &out, &opts(), &mut |_| {}).expect_err("must refuse").to_string();
    assert!(e.contains("--force") && e.contains(&out.display().to_string()), "{e}");
    assert!(out.join("marker").exists());
    convert(&out, &ConvertOptions { force: true, ..opts() });
    assert!(!out.join("marker").exists() && out.join("config.json").exists());
    let leftovers: Vec<_> = std::fs::read_dir(out.parent().unwrap()).unwrap().filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
    assert_eq!(leftovers.len(), 1, "temporary directories left behind: {leftovers:?}");
    std::fs::remove_dir_all(out.parent().unwrap()).ok();
}

#[test]
fn rebuilt_tokenizer_json_matches_the_gguf_tokenizer_on_wikitext() {
    let path = test_support::assets::wikitext_test();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let sample: String = text.chars().take(20_000).collect();
    let hf = tokenizers::Tokenizer::from_file(converted().join("tokenizer.json")).unwrap();
    let g = gguf_model();
    let want = g.tokenizer.encode(&sample, false);
    let got = hf.encode(sample.as_str(), false).unwrap().get_ids().to_vec();
    assert!(want.len() > 4000, "sample too short: {} tokens", want.len());
    let first_diff = want.iter().zip(&got).position(|(a, b)| a != b);
    assert_eq!((first_diff, got.len()), (None, want.len()), "tokenizer.json diverges from the GGUF tokenizer");
    let chat = "<|im_start|>user\nHi<|im_end|>\n";
    assert_eq!(hf.encode(chat, false).unwrap().get_ids(), g.tokenizer.encode(chat, false).as_slice());
}

fn rewrite(file: &Path, edit: impl FnOnce(&mut Vec<(String, Array)>)) {
    let mut tensors = safetensors::read_safetensors(file).unwrap();
    edit(&mut tensors);
    let mut map = std::collections::HashMap::new();
    for (n, a) in tensors {
        map.insert(n, a);
    }
    Array::save_safetensors(map, None::<&std::collections::HashMap<String, String>>, file).unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn strict_keys_report_every_missing_and_unexpected_tensor() {
    let dir = temp_dir("keys").join("m");
    copy_dir(converted(), &dir);
    rewrite(&dir.join("model.safetensors"), |t| {
        t.retain(|(n, _)| n != "model.norm.weight");
        t.push(("model.layers.0.mlp.extra.weight".into(), Array::from_slice(&[1.0f32, 2.0], &[2])));
        // A RoPE table is dropped by sanitize, not reported.
        t.push(("model.layers.0.self_attn.rotary_emb.inv_freq".into(), Array::from_slice(&[1.0f32], &[1])));
    });
    let e = load_dir(&dir, Dtype::Float32).err().expect("must fail").to_string();
    assert!(e.contains("model.norm.weight") && e.contains("model.layers.0.mlp.extra.weight"), "{e}");
    assert!(!e.contains("inv_freq"), "{e}");
    std::fs::remove_dir_all(dir.parent().unwrap()).ok();
}

#[test]
fn corrupt_and_truncated_files_are_named_in_the_error() {
    let dir = temp_dir("corrupt").join("m");
    copy_dir(converted(), &dir);
    let st = dir.join("model.safetensors");
    let len = std::fs::metadata(&st).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&st).unwrap();
    f.set_len(len / 2).unwrap();
    drop(f);
    let e = load_dir(&dir, Dtype::Float32).err().expect("truncated file must fail").to_string();
    assert!(e.contains("model.safetensors"), "{e}");
    std::fs::write(&st, b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage").unwrap();
    let e = load_dir(&dir, Dtype::Float32).err().expect("garbage header must fail").to_string();
    assert!(e.contains("model.safetensors"), "{e}");
    std::fs::remove_file(&st).unwrap();
    let e = load_dir(&dir, Dtype::Float32).err().expect("missing weights must fail").to_string();
    assert!(e.contains("model.safetensors"), "{e}");
    std::fs::remove_dir_all(dir.parent().unwrap()).ok();
}
