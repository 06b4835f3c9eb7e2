//! A random-weight Llama model written as a Q4_0 GGUF file, so that this engine and llama.cpp
//! can be timed on the very same file on a machine that cannot download models.
//!
//! The shapes are [`crate::random::preset`]'s; the file is what llama.cpp's converter and
//! `llama-quantize` would make of such a checkpoint: architecture `llama`, its key and tensor
//! names, 2-D weights in Q4_0 and norms in F32. Choices that keep both engines on one footing:
//! - Llama-3.1's llama3 RoPE scaling is not written. llama.cpp would take it from a
//!   `rope_freqs.weight` tensor, which our GGUF loader refuses, so both engines run plain RoPE
//!   at the preset's base frequency: the same arithmetic, and speed does not depend on it.
//! - A tied preset (`tiny`) gets no `output.weight`; both engines then reuse the embedding.
//! - The vocabulary is SentencePiece-style (`tokenizer.ggml.model = "llama"`), which both
//!   tokenizers read: `<unk>`, `<s>`, `</s>`, the 256 byte tokens, "▁" and printable ASCII, so
//!   text becomes one token per character in both, then filler pieces that no text produces.
//! - Q4_0 blocks are drawn directly rather than quantized from floats (see [`CodeTable`]): the
//!   8B preset's 8·10⁹ weights take seconds on one core, where normal draws plus quantization
//!   would take minutes. The weights are still close to N(0, 0.02²), as in [`crate::random`].

use std::io::{self, Write};
use std::path::Path;

use half::f16;

use crate::error::{ModelError, Result};
use crate::families::llama::Config;
use crate::gguf::{GgmlType, GgufWriter, TensorSpec, Q4_0_BLOCK, Q4_0_BYTES};

/// Standard deviation of the weights, as in [`crate::random`].
const WEIGHT_STD: f64 = 0.02;
/// Spread of the drawn codes, in quantization steps: most of Q4_0's range is used, and the
/// 1.2% of a normal beyond ±7 steps is folded onto ±7.
const CODE_STD: f64 = 3.0;
/// Each block's scale varies uniformly by up to this fraction around its mean, as real ones do.
const SCALE_JITTER: f64 = 0.25;
/// Blocks generated per write: about 300 KB, small beside any tensor and the write buffer.
const CHUNK_BLOCKS: usize = 1 << 14;

/// llama.cpp's `llama_token_type` values.
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const BYTE: i32 = 6;
/// Special tokens first, at the ids SentencePiece gives them (unknown, bos, eos).
const SPECIALS: [(&str, i32); 3] = [("<unk>", UNKNOWN), ("<s>", CONTROL), ("</s>", CONTROL)];
/// `general.file_type` of a file whose weights are mostly Q4_0 (llama.cpp's `LLAMA_FTYPE_MOSTLY_Q4_0`).
const FILE_TYPE_Q4_0: u32 = 2;

/// Writes preset `preset`'s model with random Q4_0 weights drawn from `seed` to `path`.
pub fn write_random_llama_gguf(preset: &str, path: &Path, seed: u64) -> Result<()> {
    write_llama_gguf(&crate::random::preset(preset)?, preset, path, seed)
}

/// Writes a random-weight model of `cfg` (a plain Llama: no biases, no q/k norms) to `path`.
pub(crate) fn write_llama_gguf(cfg: &Config, name: &str, path: &Path, seed: u64) -> Result<()> {
    if cfg.model_type != "llama" || cfg.has_qkv_bias() || cfg.has_qk_norm() {
        let reason = format!(
            "preset '{name}' is model_type '{}'; only plain Llama presets can be written as GGUF",
            cfg.model_type
        );
        return Err(ModelError::Unsupported { path: path.into(), reason });
    }
    let mut w = GgufWriter::new();
    metadata(&mut w, cfg, name);
    vocabulary(&mut w, cfg.vocab_size).map_err(|reason| ModelError::Unsupported { path: path.into(), reason })?;
    for (tensor, shape, ty) in tensors(cfg) {
        w.add_tensor(&tensor, &shape, ty);
    }
    let table = CodeTable::new();
    w.write(path, |i, spec, out| write_tensor(spec, &table, tensor_seed(seed, i), out))
}

fn metadata(w: &mut GgufWriter, cfg: &Config, name: &str) {
    let u = |x: usize| x as u32;
    w.add_string("general.architecture", "llama").add_string("general.name", &format!("random {name}"));
    w.add_u32("general.alignment", 32).add_u32("general.file_type", FILE_TYPE_Q4_0);
    w.add_u32("general.quantization_version", 2);
    w.add_u32("llama.block_count", u(cfg.num_hidden_layers))
        .add_u32("llama.context_length", u(cfg.max_position_embeddings));
    w.add_u32("llama.embedding_length", u(cfg.hidden_size))
        .add_u32("llama.feed_forward_length", u(cfg.intermediate_size));
    w.add_u32("llama.attention.head_count", u(cfg.num_attention_heads));
    w.add_u32("llama.attention.head_count_kv", u(cfg.num_key_value_heads));
    w.add_u32("llama.attention.key_length", u(cfg.head_dim()))
        .add_u32("llama.attention.value_length", u(cfg.head_dim()));
    w.add_f32("llama.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
        .add_f32("llama.rope.freq_base", cfg.rope_theta);
    w.add_u32("llama.rope.dimension_count", u(cfg.head_dim())).add_u32("llama.vocab_size", u(cfg.vocab_size));
}

/// The SentencePiece vocabulary of `n` tokens described in the module doc.
fn vocabulary(w: &mut GgufWriter, n: usize) -> std::result::Result<(), String> {
    let mut tokens: Vec<String> = SPECIALS.iter().map(|(t, _)| t.to_string()).collect();
    let mut types: Vec<i32> = SPECIALS.iter().map(|&(_, ty)| ty).collect();
    tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
    types.resize(tokens.len(), BYTE);
    tokens.push("\u{2581}".into());
    tokens.extend(('!'..='~').map(String::from));
    let min = tokens.len();
    if n < min {
        return Err(format!("vocabulary of {n} tokens is smaller than the {min} this writer needs"));
    }
    tokens.extend((min..n).map(|i| format!("\u{2581}t{i}")));
    types.resize(n, NORMAL);
    // Control and byte tokens score 0 as in SentencePiece models; normal pieces rank by id.
    let scores = (0..n).map(|i| if types[i] == NORMAL { -(i as f32) } else { 0.0 }).collect();
    w.add_string("tokenizer.ggml.model", "llama").add_string_array("tokenizer.ggml.tokens", tokens);
    w.add_f32_array("tokenizer.ggml.scores", scores).add_i32_array("tokenizer.ggml.token_type", types);
    w.add_u32("tokenizer.ggml.unknown_token_id", 0).add_u32("tokenizer.ggml.bos_token_id", 1);
    w.add_u32("tokenizer.ggml.eos_token_id", 2).add_bool("tokenizer.ggml.add_bos_token", true);
    w.add_bool("tokenizer.ggml.add_eos_token", false).add_bool("tokenizer.ggml.add_space_prefix", true);
    Ok(())
}

/// Every tensor in llama.cpp's names and order, with ggml dims (a `[out, in]` matrix is `[in, out]`).
fn tensors(cfg: &Config) -> Vec<(String, Vec<u64>, GgmlType)> {
    let d = |x: usize| x as u64;
    let (h, f, v) = (d(cfg.hidden_size), d(cfg.intermediate_size), d(cfg.vocab_size));
    let (q, kv) = (d(cfg.num_attention_heads * cfg.head_dim()), d(cfg.num_key_value_heads * cfg.head_dim()));
    let mut out = vec![("token_embd.weight".to_string(), vec![h, v], GgmlType::Q4_0)];
    for i in 0..cfg.num_hidden_layers {
        let layer = [
            ("attn_norm", vec![h]),
            ("attn_q", vec![h, q]),
            ("attn_k", vec![h, kv]),
            ("attn_v", vec![h, kv]),
            ("attn_output", vec![q, h]),
            ("ffn_norm", vec![h]),
            ("ffn_gate", vec![h, f]),
            ("ffn_up", vec![h, f]),
            ("ffn_down", vec![f, h]),
        ];
        for (module, shape) in layer {
            let ty = if shape.len() == 1 { GgmlType::F32 } else { GgmlType::Q4_0 };
            out.push((format!("blk.{i}.{module}.weight"), shape, ty));
        }
    }
    out.push(("output_norm.weight".to_string(), vec![h], GgmlType::F32));
    if !cfg.tie_word_embeddings {
        out.push(("output.weight".to_string(), vec![h, v], GgmlType::Q4_0));
    }
    out
}

/// SplitMix64: tiny, fast, and good enough for weights whose values no result depends on.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Each tensor its own stream, so its values do not depend on the tensors before it.
fn tensor_seed(seed: u64, index: usize) -> u64 {
    SplitMix64(seed ^ (index as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)).next()
}

/// Q4_0 codes of a discretized N(0, CODE_STD²), looked up by one random byte each: code
/// `8 + k` takes a share of the 256 byte values proportional to the normal's mass at `k`
/// (the tails beyond ±7 folded onto ±7), in equal shares for `k` and `-k`, so the mean is
/// exactly 0. The mean block scale makes weights of standard deviation [`WEIGHT_STD`].
struct CodeTable {
    codes: [u8; 256],
    scale_mean: f64,
}

impl CodeTable {
    fn new() -> Self {
        let mass = |k: i32| (-(k * k) as f64 / (2.0 * CODE_STD * CODE_STD)).exp();
        let total: f64 = (-64..=64).map(mass).sum();
        let mut codes = [8u8; 256];
        let (mut at, mut var) = (0usize, 0f64);
        for k in 1..=7i32 {
            let m = if k == 7 { (7..=64).map(mass).sum() } else { mass(k) };
            let n = (256.0 * m / total).round() as usize;
            codes[at..at + n].fill(8 - k as u8);
            codes[at + n..at + 2 * n].fill(8 + k as u8);
            at += 2 * n;
            var += (2 * n) as f64 * (k * k) as f64 / 256.0;
        }
        let jitter_rms = (1.0 + SCALE_JITTER * SCALE_JITTER / 3.0).sqrt();
        CodeTable { codes, scale_mean: WEIGHT_STD / (var.sqrt() * jitter_rms) }
    }

    fn block(&self, rng: &mut SplitMix64, out: &mut [u8]) {
        let u = (rng.next() >> 11) as f64 / (1u64 << 53) as f64;
        let d = self.scale_mean * (1.0 + SCALE_JITTER * (2.0 * u - 1.0));
        out[..2].copy_from_slice(&f16::from_f64(d).to_le_bytes());
        let mut bytes = [0u8; Q4_0_BLOCK];
        for c in bytes.chunks_exact_mut(8) {
            c.copy_from_slice(&rng.next().to_le_bytes());
        }
        for j in 0..Q4_0_BLOCK / 2 {
            out[2 + j] = self.codes[bytes[j] as usize] | (self.codes[bytes[j + Q4_0_BLOCK / 2] as usize] << 4);
        }
    }
}

/// Streams tensor `spec`'s data: ones for F32 norms, random blocks for Q4_0 weights.
fn write_tensor(spec: &TensorSpec, table: &CodeTable, seed: u64, out: &mut dyn Write) -> io::Result<()> {
    match spec.ggml_type {
        GgmlType::F32 => {
            let ones: Vec<u8> = (0..spec.n_elements()).flat_map(|_| 1f32.to_le_bytes()).collect();
            out.write_all(&ones)
        }
        GgmlType::Q4_0 => {
            let mut rng = SplitMix64(seed);
            let mut left = (spec.n_elements() / Q4_0_BLOCK as u64) as usize;
            let mut buf = vec![0u8; CHUNK_BLOCKS.min(left) * Q4_0_BYTES];
            while left > 0 {
                let n = CHUNK_BLOCKS.min(left);
                for b in buf[..n * Q4_0_BYTES].chunks_exact_mut(Q4_0_BYTES) {
                    table.block(&mut rng, b);
                }
                out.write_all(&buf[..n * Q4_0_BYTES])?;
                left -= n;
            }
            Ok(())
        }
        other => Err(io::Error::other(format!("no random generator for {other} tensors"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{GgufFile, MetaValue};
    use mlx_kv::{CacheOptions, KvCache, KvSpec};
    use mlx_rs::{Array, Dtype};
    use std::path::PathBuf;

    fn temp_file(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kvsplit-random-gguf-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("model.gguf")
    }

    #[test]
    fn code_table_is_centred_and_scaled() {
        let t = CodeTable::new();
        let codes: Vec<f64> = t.codes.iter().map(|&c| c as f64 - 8.0).collect();
        assert!(t.codes.iter().all(|&c| (1..=15).contains(&c)));
        assert_eq!(codes.iter().sum::<f64>(), 0.0);
        let std = (codes.iter().map(|c| c * c).sum::<f64>() / 256.0).sqrt();
        // Rounding 256 shares moves the spread by well under one step.
        assert!((std - CODE_STD).abs() < 0.1, "code std {std}");
    }

    #[test]
    fn llama_8b_has_the_published_parameter_count() {
        let cfg = crate::random::preset("llama3.1-8b").unwrap();
        let specs: Vec<TensorSpec> = tensors(&cfg)
            .into_iter()
            .map(|(name, ggml_shape, ggml_type)| TensorSpec { name, ggml_shape, ggml_type })
            .collect();
        assert_eq!(specs.iter().map(TensorSpec::n_elements).sum::<u64>(), 8_030_261_248);
        let bytes: u64 = specs.iter().map(TensorSpec::n_bytes).sum();
        assert!((4_500_000_000..4_600_000_000).contains(&bytes), "{bytes} bytes");
        // Refused before any file is created.
        let e =
            write_random_llama_gguf("qwen2.5-7b", &std::env::temp_dir().join("never.gguf"), 0).unwrap_err().to_string();
        assert!(e.contains("model_type 'qwen2'"), "{e}");
    }

    /// The tiny preset's file carries every key both loaders read, llama.cpp's tensor names
    /// and shapes, Q4_0 weights of about N(0, 0.02²), and a vocabulary our tokenizer reads.
    #[test]
    fn tiny_file_has_the_keys_tensors_and_vocabulary() {
        let path = temp_file("tiny");
        write_random_llama_gguf("tiny", &path, 5).unwrap();
        let g = GgufFile::open(&path).unwrap();
        let u32s = [
            ("general.alignment", 32),
            ("general.file_type", 2),
            ("llama.block_count", 2),
            ("llama.context_length", 131072),
            ("llama.embedding_length", 256),
            ("llama.feed_forward_length", 512),
            ("llama.attention.head_count", 4),
            ("llama.attention.head_count_kv", 2),
            ("llama.attention.key_length", 64),
            ("llama.rope.dimension_count", 64),
            ("llama.vocab_size", 1000),
            ("tokenizer.ggml.unknown_token_id", 0),
            ("tokenizer.ggml.bos_token_id", 1),
            ("tokenizer.ggml.eos_token_id", 2),
        ];
        for (k, v) in u32s {
            assert_eq!(g.get(k), Some(&MetaValue::U32(v)), "{k}");
        }
        assert_eq!(
            (g.get_str("general.architecture").unwrap(), g.get_str("tokenizer.ggml.model").unwrap()),
            ("llama", "llama")
        );
        assert_eq!(g.get_f32("llama.attention.layer_norm_rms_epsilon").unwrap(), 1e-5);
        assert_eq!(g.get_f32("llama.rope.freq_base").unwrap(), 10000.0);
        let tokens = g.get_str_array("tokenizer.ggml.tokens").unwrap();
        let types = g.get_int_array("tokenizer.ggml.token_type").unwrap();
        assert_eq!(
            (tokens.len(), types.len(), g.get_f32_array("tokenizer.ggml.scores").unwrap().len()),
            (1000, 1000, 1000)
        );
        assert_eq!(
            (&tokens[..3], &types[..4]),
            (&["<unk>".to_string(), "<s>".into(), "</s>".into()][..], &[2, 3, 3, 6][..])
        );
        assert_eq!((tokens[3 + 0x0A].as_str(), types[258], types[259]), ("<0x0A>", 6, 1));

        let names: Vec<&str> = g.tensors().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names.len(), 1 + 2 * 9 + 1, "{names:?}");
        assert!(!names.contains(&"output.weight"), "tiny ties its output head to the embedding");
        for (name, shape, ty) in tensors(&crate::random::preset("tiny").unwrap()) {
            let t = g.tensor(&name).unwrap();
            assert_eq!((&t.ggml_shape, t.ggml_type), (&shape, ty), "{name}");
        }
        assert_eq!(g.tensor("blk.1.ffn_down.weight").unwrap().shape(), vec![256, 512]);
        assert_eq!(g.dequantize("blk.0.attn_norm.weight").unwrap(), vec![1.0; 256]);

        let a = g.to_mlx_affine("blk.0.attn_q.weight").unwrap();
        assert_eq!((a.bits, a.weight_shape(), a.scales_shape()), (4, [256, 32], [256, 8]));
        let w = a.dequantize();
        assert_eq!(w, g.dequantize("blk.0.attn_q.weight").unwrap());
        let mean = w.iter().map(|&x| x as f64).sum::<f64>() / w.len() as f64;
        let std = (w.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / w.len() as f64).sqrt();
        // 65536 draws: the sample mean is within 4 standard errors of 0; the spread is set by the
        // table and the scale, each exact to about 1%.
        assert!(mean.abs() < 4.0 * WEIGHT_STD / (w.len() as f64).sqrt(), "mean {mean}");
        assert!((std / WEIGHT_STD - 1.0).abs() < 0.03, "std {std}");
        assert_ne!(
            g.tensor_bytes(g.tensor("blk.0.attn_q.weight").unwrap()),
            g.tensor_bytes(g.tensor("blk.1.attn_q.weight").unwrap())
        );

        let tok = crate::tokenizer::Tokenizer::from_gguf(&g).unwrap();
        let ids = tok.encode("Hi é", true);
        // BOS, "▁", "H", "i", "▁", then é as the bytes C3 A9.
        assert_eq!(ids, vec![1, 259, 259 + 40, 259 + 73, 259, 3 + 0xC3, 3 + 0xA9]);
        assert_eq!(tok.decode(&ids), "Hi é");
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    /// The file loads through the loader `generate --model` uses and decodes finite logits,
    /// with the output head tied (tiny) and stored (as the 8B preset has it).
    #[test]
    fn tiny_file_loads_and_decodes() {
        let tied = crate::random::preset("tiny").unwrap();
        let untied = Config { tie_word_embeddings: false, ..tied.clone() };
        for (tag, cfg) in [("tied", tied), ("untied", untied)] {
            let path = temp_file(tag);
            write_llama_gguf(&cfg, "tiny", &path, 11).unwrap();
            let loaded = crate::load::load(&path, Dtype::Float32).unwrap();
            let m = &loaded.model;
            assert_eq!((m.family(), m.n_layers(), m.head_dim(), m.n_kv_heads()), ("llama", 2, 64, 2));
            assert_eq!(loaded.tokenizer.vocab_size(), 1000);
            let mut caches: Vec<KvCache> = (0..m.n_layers())
                .map(|_| KvCache::new(KvSpec::bits(8, 4), m.head_dim(), CacheOptions::default()).unwrap())
                .collect();
            let prompt: Vec<i32> = loaded.tokenizer.encode("Hello", true).iter().map(|&t| t as i32).collect();
            m.forward(&Array::from_slice(&prompt, &[1, prompt.len() as i32]), &mut caches, true).unwrap();
            for step in 0..3 {
                let logits = m.forward(&Array::from_slice(&[300 + step], &[1, 1]), &mut caches, true).unwrap();
                assert_eq!(logits.shape(), &[1, 1, 1000], "{tag}");
                let v = logits.as_dtype(Dtype::Float32).unwrap();
                assert!(v.as_slice::<f32>().iter().all(|x| x.is_finite()), "{tag}: non-finite logits at step {step}");
            }
            assert_eq!(caches[0].len(), prompt.len() + 3);
            std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
        }
    }
}
