#!/usr/bin/env python3
"""mlx-lm as the oracle of our model code (issue #21): for each architecture, a tiny random
model built with mlx-lm's own model class and the checkpoint's real config keys, saved as an
mlx-community-style directory twice (dense f32, and f16 quantized by mlx-lm's `quantize_model`
with group 64 and 4 bits as mlx-community does), with mlx-lm's logits at every position of fixed token ids and
its 16 greedy tokens after them. `crates/models/tests/mlxlm_oracle.rs` loads each directory
with our loader and compares.

Run by scripts/mlxlm-oracle.sh (which makes the venv: mlx[cpu] and mlx-lm 0.32.2 from PyPI).
Usage: python mlxlm_oracle.py OUT TOKENIZER_DIR [CASES]
  OUT            one directory per case is written there, plus OUT/cases.json
  TOKENIZER_DIR  tokenizer files copied into every model directory (their vocabulary sets the
                 models' vocab_size)
  CASES          only these comma-separated case names (e.g. gemma3,qwen3), for debugging
"""
import importlib
import json
import shutil
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.utils import quantize_model

IDS = [1, 17, 254, 999, 3, 4096, 77, 12345, 5, 640]
GREEDY = 16

# (case, mlx-lm module, config.json): small dims, every dimension a multiple of the quantization
# group (64) where a quantized matrix has it, two KV heads for GQA, two or more layers.
def families(vocab):
    # The shape every case shares; each adds its model_type and its own keys.
    shape = dict(vocab_size=vocab, rms_norm_eps=1e-5, max_position_embeddings=512, hidden_size=128,
                 num_hidden_layers=2, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    cfg = lambda model_type, **keys: dict(shape, model_type=model_type, **keys)
    cases = [
        ("llama", "llama", cfg("llama", rope_theta=10000.0, tie_word_embeddings=False)),
        # SmolLM2's layout: tied embeddings.
        ("llama-tied", "llama", cfg("llama", rope_theta=100000.0, tie_word_embeddings=True)),
        ("mistral", "llama", cfg("mistral", rope_theta=1000000.0, tie_word_embeddings=False)),
        ("qwen2", "qwen2", cfg("qwen2", rope_theta=1000000.0, tie_word_embeddings=True)),
        ("qwen3", "qwen3", cfg("qwen3", head_dim=64, rope_theta=1000000.0, tie_word_embeddings=True)),
        ("phi3", "phi3", cfg("phi3", rope_theta=10000.0, tie_word_embeddings=False)),
        # Gemma 3's text model: a sliding-window layer and a global one (pattern 2), q/k norms,
        # the query pre-attention scalar and the embedding scale.
        ("gemma3", "gemma3_text", cfg("gemma3_text", head_dim=64, rms_norm_eps=1e-6, rope_theta=1000000.0,
                                      rope_local_base_freq=10000.0, query_pre_attn_scalar=64,
                                      sliding_window=512, sliding_window_pattern=2)),
    ]
    # A Gemma 3 checkpoint that stores its own output head (a fine-tune may): mlx-lm then uses
    # that head instead of the embedding.
    gemma = cases[-1]
    cases.append(("gemma3-head", gemma[1], dict(gemma[2])))
    # Gemma 2: soft caps small enough to bite at these dims (layer 0's raw scores span about
    # +-12, printed below, so tanh(s / 5) is far from linear; raw logits exceed the final cap
    # of 5 too), and a window of 8 that the 10 ids and 16 greedy tokens slide through (even
    # layers; see hf_sliding_window: windowed and global logits differ by ~3 from position 8).
    gemma2 = cfg("gemma2", head_dim=64, rms_norm_eps=1e-6, rope_theta=10000.0, query_pre_attn_scalar=64,
                 sliding_window=GEMMA2_WINDOW, attn_logit_softcapping=5.0, final_logit_softcapping=5.0)
    cases.append(("gemma2", "gemma2", gemma2))
    # Mixtures of experts: 4 experts, top 2. Qwen3-MoE with a dense layer (mlp_only_layers) and
    # a sparse one, as its real config keys allow. The "-hf" cases are saved with Hugging Face's
    # per-expert tensors instead of mlx-lm's stacked ones, and route without renormalising.
    mixtral = cfg("mixtral", num_local_experts=4, num_experts_per_tok=2, rope_theta=1000000.0,
                  tie_word_embeddings=False)
    qwen3_moe = cfg("qwen3_moe", head_dim=64, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
                    mlp_only_layers=[0], moe_intermediate_size=128, norm_topk_prob=True, rope_theta=1000000.0,
                    tie_word_embeddings=False)
    cases += [("mixtral", "mixtral", mixtral), ("mixtral-hf", "mixtral", dict(mixtral)),
              ("qwen3_moe", "qwen3_moe", qwen3_moe),
              ("qwen3_moe-hf", "qwen3_moe", dict(qwen3_moe, norm_topk_prob=False))]
    # gpt-oss: biased q/k/v/o, a learned sink logit per head (see SINK_STD), YaRN RoPE with
    # gpt-oss-20b's own block, a sliding layer whose window of 8 the 26 tokens pass, and 4
    # biased experts (top 2) with the clamped SwiGLU. The "-hf" case (dense only) is saved in
    # Hugging Face's layout: fused, interleaved `gate_up_proj` [E, hidden, 2 * inter], `x @ W`.
    gpt_oss = cfg("gpt_oss", head_dim=64, num_local_experts=4, num_experts_per_tok=2, rope_theta=150000.0,
                  sliding_window=GPT_OSS_WINDOW, layer_types=["sliding_attention", "full_attention"],
                  rope_scaling=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0,
                                    original_max_position_embeddings=4096),
                  tie_word_embeddings=False)
    cases += [("gpt_oss", "gpt_oss", gpt_oss), ("gpt_oss-hf", "gpt_oss", dict(gpt_oss))]
    return cases


GPT_OSS_WINDOW = 8
# gpt-oss sink logits: spread so that some heads give the sink most of their weight and others
# almost none (the init's 1 + 0.1 N would make every head alike).
SINK_STD = 2.0


def gpt_oss_weights(model):
    """Biases at 0.1 N instead of the norms' 1 + 0.1 N: q and k biases near 1 in every dimension
    would make every score about 14, against which a sink of a few units weighs nothing
    (removing the sinks then moved logits by 0.003, under the f32 bound). Sinks at SINK_STD N."""
    model.update(tree_unflatten([(k, 0.1 * mx.random.normal(v.shape))
                                 for k, v in tree_flatten(model.parameters()) if k.endswith(".bias")]))
    for layer in model.layers:
        layer.self_attn.sinks = SINK_STD * mx.random.normal(layer.self_attn.sinks.shape)


def sink_effect(model):
    """Largest logit change over IDS when every sink logit is -inf, to show that sinks bite."""
    with_sinks = model(mx.array([IDS]))
    kept = [layer.self_attn.sinks for layer in model.layers]
    for layer in model.layers:
        layer.self_attn.sinks = mx.full(layer.self_attn.sinks.shape, -mx.inf, dtype=layer.self_attn.sinks.dtype)
    moved = float(mx.abs(model(mx.array([IDS])) - with_sinks).max().item())
    for layer, s in zip(model.layers, kept):
        layer.self_attn.sinks = s
    return moved


def hf_fused_experts(weights):
    """mlx-lm's stacked gpt-oss experts (`experts.P.weight` [E, out, in], `experts.P.bias`) as
    Hugging Face's transformers stores them: `gate_up_proj` [E, in, 2 * out] with gate and up in
    alternate columns, `down_proj` [E, in, out], and `*_bias`."""
    out = {}
    for k, v in weights.items():
        if ".mlp.experts." not in k:
            out[k] = v
    prefixes = {k.split(".experts.")[0] for k in weights if ".mlp.experts." in k}
    for p in prefixes:
        w = lambda n: weights[f"{p}.experts.{n}"]
        e, i, h = w("gate_proj.weight").shape
        gate_up = mx.stack([w("gate_proj.weight").transpose(0, 2, 1), w("up_proj.weight").transpose(0, 2, 1)], axis=-1)
        out[f"{p}.experts.gate_up_proj"] = gate_up.reshape(e, h, 2 * i)
        out[f"{p}.experts.gate_up_proj_bias"] = mx.stack([w("gate_proj.bias"), w("up_proj.bias")], axis=-1).reshape(e, 2 * i)
        out[f"{p}.experts.down_proj"] = mx.contiguous(w("down_proj.weight").transpose(0, 2, 1))
        out[f"{p}.experts.down_proj_bias"] = w("down_proj.bias")
    return out


def mxfp4_experts(rest):
    """quantize_model's predicate: experts in mxfp4 (group 32, 4 bits), everything else at the
    call's affine default when `rest`, else left in floats (OpenAI's checkpoints)."""
    def predicate(path, _):
        if ".experts." in path or path.endswith(".experts"):
            return {"group_size": 32, "bits": 4, "mode": "mxfp4"}
        return rest
    return predicate


def hf_mxfp4_experts(weights):
    """mlx-lm's mxfp4 experts (`experts.P.weight` u32 [E, out, in/8], `.scales` u8 [E, out,
    in/32]) as OpenAI's checkpoint stores them: `gate_up_proj_blocks` u8 [E, 2 out, in/32, 16]
    with gate and up on alternate rows, `_scales` likewise, `down_proj_blocks`, and the biases
    as `hf_fused_experts` writes them."""
    out = {k: v for k, v in weights.items() if ".mlp.experts." not in k}
    prefixes = {k.split(".experts.")[0] for k in weights if ".mlp.experts." in k}
    for p in prefixes:
        w = lambda n: weights[f"{p}.experts.{n}"]
        e, o, words = w("gate_proj.weight").shape
        blocks = lambda a: a.view(mx.uint8).reshape(a.shape[0], a.shape[1], -1, 16)
        inter = lambda a, b: mx.stack([a, b], axis=2).reshape(a.shape[0], 2 * a.shape[1], *a.shape[2:])
        out[f"{p}.experts.gate_up_proj_blocks"] = inter(blocks(w("gate_proj.weight")), blocks(w("up_proj.weight")))
        out[f"{p}.experts.gate_up_proj_scales"] = inter(w("gate_proj.scales"), w("up_proj.scales"))
        out[f"{p}.experts.gate_up_proj_bias"] = mx.stack([w("gate_proj.bias"), w("up_proj.bias")], axis=-1).reshape(e, 2 * o)
        out[f"{p}.experts.down_proj_blocks"] = blocks(w("down_proj.weight"))
        out[f"{p}.experts.down_proj_scales"] = w("down_proj.scales")
        out[f"{p}.experts.down_proj_bias"] = w("down_proj.bias")
    return out


GEMMA2_WINDOW = 8


def hf_sliding_window(model, window):
    """mlx-lm 0.32.2's gemma2 ignores `sliding_window` (every layer global); Hugging Face's and
    llama.cpp's Gemma 2 slide a window over the even layers. This gives mlx-lm's own layers
    that: a windowed mask and a RotatingKVCache on even layers, built as mlx-lm's gemma3_text
    builds its sliding layers. Attention itself (soft cap, scale, mask) stays mlx-lm's code."""
    from mlx_lm.models.base import create_attention_mask
    from mlx_lm.models.cache import KVCache, RotatingKVCache

    class Windowed(type(model.model)):
        def __call__(self, inputs, cache=None):
            h = self.embed_tokens(inputs) * (self.args.hidden_size**0.5)
            if cache is None:
                cache = [None] * len(self.layers)
            masks = [create_attention_mask(h, cache[i], window_size=window if i == 0 else None, return_array=True)
                     for i in (0, 1)]
            for i, (layer, c) in enumerate(zip(self.layers, cache)):
                h = layer(h, masks[i % 2], c)
            return self.norm(h)

    model.model.__class__ = Windowed
    model.make_cache = lambda: [RotatingKVCache(max_size=window) if i % 2 == 0 else KVCache()
                                for i in range(len(model.layers))]


def raw_score_span(model):
    """Layer 0's scaled attention scores over IDS before the soft cap, to show the cap bites."""
    inner, attn = model.model, model.model.layers[0].self_attn
    h = inner.layers[0].input_layernorm(inner.embed_tokens(mx.array([IDS])) * (inner.args.hidden_size**0.5))
    heads = lambda y, n: y.reshape(1, len(IDS), n, -1).transpose(0, 2, 1, 3)
    q, k = heads(attn.q_proj(h), attn.n_heads), heads(attn.k_proj(h), attn.n_kv_heads)
    q, k = attn.rope(q), mx.repeat(attn.rope(k), attn.repeats, axis=1)
    s = (q * attn.scale) @ k.swapaxes(-1, -2)
    return float(s.min().item()), float(s.max().item())


# Hugging Face's names of the stacked expert projections, per family.
HF_EXPERT_NAMES = {"mixtral": {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"},
                   "qwen3_moe": {n: n for n in ("gate_proj", "up_proj", "down_proj")}}


def per_expert(weights, module):
    """mlx-lm's stacked `switch_mlp.P.{weight,scales,biases}` split into HF's
    `experts.E.P'.{...}` tensors (what mlx-lm's `sanitize` stacks again)."""
    out = {}
    for k, v in weights.items():
        if ".switch_mlp." not in k:
            out[k] = v
            continue
        prefix, rest = k.split(".switch_mlp.")
        proj, suffix = rest.split(".")
        for e in range(v.shape[0]):
            out[f"{prefix}.experts.{e}.{HF_EXPERT_NAMES[module][proj]}.{suffix}"] = v[e]
    return out


def randomize(model, seed):
    """Norm weights (1-D parameters) off their init and matrices at a scale that keeps the tiny
    model's logits spread (greedy choices then have margins)."""
    mx.random.seed(seed)
    def f(p):
        if p.ndim == 1:
            return 1.0 + 0.1 * mx.random.normal(p.shape)
        return 0.08 * mx.random.normal(p.shape)
    model.update(tree_map(f, model.parameters()))


def logits_and_greedy(model):
    """Logits at every position of IDS, then GREEDY tokens decoded one at a time through
    mlx-lm's own KV cache (a new sequence length per full recompute costs seconds each on the
    CPU backend)."""
    from mlx_lm.models.cache import make_prompt_cache
    cache = make_prompt_cache(model)
    full = model(mx.array([IDS]), cache=cache)[0].astype(mx.float32)
    mx.eval(full)
    last, out = full[-1], []
    for _ in range(GREEDY):
        nxt = int(mx.argmax(last).item())
        out.append(nxt)
        last = model(mx.array([[nxt]]), cache=cache)[0, -1].astype(mx.float32)
    return full, out


def gather_qmm_without_global_scale():
    """mlx-lm 0.32.2's quantized experts pass `global_scale=None` to `mx.gather_qmm`, an
    argument mlx 0.32.2 does not take; without a global scale the call is the plain one."""
    plain = mx.gather_qmm

    def gather_qmm(*args, global_scale=None, **kwargs):
        if global_scale is not None:
            raise ValueError("this mlx has no global_scale for gather_qmm")
        return plain(*args, **kwargs)
    mx.gather_qmm = gather_qmm


def main():
    # mlx-lm wraps activations in mx.compile, which on the CPU backend builds C++ with the
    # system compiler for every new shape (ten minutes for these cases on 2 cores); the plain
    # ops compute the same values.
    mx.disable_compile()
    gather_qmm_without_global_scale()
    if len(sys.argv) not in (3, 4) or not (Path(sys.argv[2]) / "tokenizer.json").is_file():
        sys.exit("usage: mlxlm_oracle.py OUT TOKENIZER_DIR [CASES] (TOKENIZER_DIR must hold tokenizer.json)")
    out, tok = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    vocab = len(json.loads((tok / "tokenizer.json").read_text())["model"]["vocab"])
    cases = []
    for seed, (name, module, config) in enumerate(families(vocab)):
        if len(sys.argv) > 3 and name not in sys.argv[3].split(","):
            continue
        mod = importlib.import_module("mlx_lm.models." + module)
        # gpt-oss also as it ships: experts in MXFP4, the rest 8-bit affine in mlx-community's
        # layout (its "MXFP4-Q8" checkpoints), the rest 16-bit floats in OpenAI's own.
        variants = [False, True] + (["mxfp4"] if module == "gpt_oss" else [])
        for quant in variants:
            if quant is True and name == "gpt_oss-hf":
                continue  # OpenAI's quantized layout is the mxfp4 variant
            model = mod.Model(mod.ModelArgs.from_dict(config))
            if module == "gemma3_text" and name != "gemma3-head":
                # Google's Gemma 3 checkpoints carry no lm_head; mlx-lm's `sanitize` then ties
                # the head to the embedding, as loading a real one does.
                model.sanitize({})
            randomize(model, seed)
            if module == "gpt_oss":
                gpt_oss_weights(model)
            if module == "gemma2":
                hf_sliding_window(model, config["sliding_window"])
            cfg = dict(config)
            if quant == "mxfp4":
                model.set_dtype(mx.float16)
                model, cfg = quantize_model(model, cfg, group_size=64, bits=8,
                                            quant_predicate=mxfp4_experts(rest=name != "gpt_oss-hf"))
                cfg["torch_dtype"] = "float16"
            elif quant:
                model.set_dtype(mx.float16)
                # mlx-lm's own quantizer: the model's quant_predicate (Qwen3-MoE keeps its router
                # at 8 bits) and the config block it writes, as mlx-community checkpoints have.
                model, cfg = quantize_model(model, cfg, group_size=64, bits=4)
                cfg["torch_dtype"] = "float16"
            else:
                model.set_dtype(mx.float32)
                cfg["torch_dtype"] = "float32"
            mx.eval(model.parameters())
            case = f"{name}-{'mxfp4' if quant == 'mxfp4' else 'q4' if quant else 'f32'}"
            d = out / case
            if d.exists():
                shutil.rmtree(d)
            d.mkdir()
            weights = dict(tree_flatten(model.parameters()))
            if name == "gpt_oss-hf" and quant == "mxfp4":
                weights = hf_mxfp4_experts(weights)
                cfg.pop("quantization")
                cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
            elif name == "gpt_oss-hf":
                weights = hf_fused_experts(weights)
            elif name.endswith("-hf"):
                weights = per_expert(weights, module)
            mx.save_safetensors(str(d / "model.safetensors"), weights, metadata={"format": "mlx"})
            (d / "config.json").write_text(json.dumps(cfg, indent=1))
            for f in tok.iterdir():
                shutil.copy(f, d / f.name)
            full, greedy = logits_and_greedy(model)
            if module == "gemma2":
                lo, hi = raw_score_span(model)
                print(f"{case}: layer-0 raw scores span [{lo:.2f}, {hi:.2f}] (attn cap {config['attn_logit_softcapping']}), "
                      f"final logits [{float(full.min().item()):.2f}, {float(full.max().item()):.2f}] "
                      f"(cap {config['final_logit_softcapping']})", flush=True)
            if module == "gpt_oss":
                print(f"{case}: sinks at -inf move mlx-lm's logits by up to {sink_effect(model):.3f} "
                      f"(largest logit {float(mx.abs(full).max().item()):.2f})", flush=True)
            mx.save_safetensors(str(d / "oracle.safetensors"), {"logits": full})
            cases.append({"case": case, "module": module, "quantized": bool(quant), "ids": IDS, "greedy": greedy,
                          "layers": config["num_hidden_layers"]})
            print(f"{case}: {len(weights)} tensors, greedy {greedy}", flush=True)
    (out / "cases.json").write_text(json.dumps(cases, indent=1))


if __name__ == "__main__":
    main()
