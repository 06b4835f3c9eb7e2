#!/usr/bin/env python3
"""mlx-lm's quantized KV cache on the same GPU, for comparison with kvsplit-mlx (issue #7).

Runs under MLX's own Python package (`mlx==0.32.2` wheel with the CUDA libmlx.so that
scripts/gpu-run.sh stages) and mlx-lm 0.32.2 (pure Python, carried as a wheel). mlx-lm has one
bit width for K and V, so the rows are fp16, k8v8 and k4v4. Three parts:

1. correctness of mlx-lm's `quantized_scaled_dot_product_attention` (it reshapes GQA to 5-D
   `quantized_matmul`, which MLX 0.32.2's CUDA backend gets wrong) against f32 attention over
   the dequantized cache, printed as max |error|;
2. one decode-attention call at depths 4K..128K, 8 KV heads x 4 query rows, D=128, one call on
   each of N distinct caches per evaluation (as fused_check's `batched` rows), ms per call;
3. whole-model greedy decode tok/s of a random-weight model with Llama-3.1-8B's shapes (4-bit
   weights, group 64, as our `bench --random-model llama3.1-8b --random-weights q4`), the cache
   filled with random keys/values to each depth (as our `--fill random`).

Usage: mlxlm-decode-bench.py [--quick | --tiny] [--prefill N,N,...]   (CSV lines start with `csv:`)
  --quick  32K only, one correctness depth
  --tiny   a 2-layer model and short depths: checks the script itself (on CPU too)
  --prefill N,...  only whole-model prefill of prompts of N random tokens into an empty cache, as
           mlx-lm's generate runs it (chunks of 2048 tokens, each evaluated with the cache state),
           fp16 and 8-bit caches, tok/s and peak memory (the model's weights included), two repeats
mlx_lm's package __init__ imports transformers and its tokenizer stack, which a speed run does
not need; the model and cache modules are imported without it.
"""
import importlib.util
import os
import sys
import time
import types

import mlx.core as mx
import mlx.nn as nn

spec = importlib.util.find_spec("mlx_lm")
if spec is None:
    sys.exit("mlx_lm is not importable: install the mlx-lm wheel (see scripts/gpu-run.sh)")
pkg = types.ModuleType("mlx_lm")
pkg.__path__ = list(spec.submodule_search_locations)
sys.modules["mlx_lm"] = pkg
from mlx_lm.models import cache as lm_cache  # noqa: E402
from mlx_lm.models import llama  # noqa: E402
from mlx_lm.models.base import quantized_scaled_dot_product_attention  # noqa: E402

QUICK = "--quick" in sys.argv
TINY = "--tiny" in sys.argv
HKV, REP, D = 8, 4, 128
GROUP = 64
print(f"mlx {mx.__version__}, device {mx.default_device()}, mlx_lm from {pkg.__path__[0]}")


def fill_cache(c, t, chunk=4096):
    """Writes t tokens of random keys/values into an mlx-lm cache in chunks."""
    k = mx.random.normal((1, HKV, min(chunk, t), D)).astype(mx.float16)
    v = mx.random.normal((1, HKV, min(chunk, t), D)).astype(mx.float16)
    done = 0
    while done < t:
        n = min(chunk, t - done)
        c.update_and_fetch(k[:, :, :n], v[:, :, :n])
        mx.eval(c.state)
        done += n


def make_cache(bits):
    return lm_cache.KVCache() if bits == 16 else lm_cache.QuantizedKVCache(group_size=GROUP, bits=bits)


def attend(c, q, bits):
    scale = D ** -0.5
    if bits == 16:
        k, v = c.keys[..., : c.offset, :], c.values[..., : c.offset, :]
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    kq = tuple(x[..., : c.offset, :] for x in c.keys)
    vq = tuple(x[..., : c.offset, :] for x in c.values)
    return quantized_scaled_dot_product_attention(q, kq, vq, scale=scale, mask=None, group_size=GROUP, bits=bits)


def correctness():
    print("correctness of mlx-lm quantized attention on this backend (max |out - f32 ref over dequantized cache|):")
    for bits in (8, 4):
        # Multiples of mlx-lm's 256-token allocation step: at other lengths the cache is a
        # slice of its buffer, for which MLX 0.32.2's CUDA quantized_matmul has no kernel.
        for t in (1024,) if QUICK else (1024, 4096):
            c = make_cache(bits)
            fill_cache(c, t)
            q = mx.random.normal((1, HKV * REP, 1, D)).astype(mx.float16)
            # quantized_scaled_dot_product_attention scales its queries in place (`*=`), so it
            # gets a copy.
            got = attend(c, q + 0, bits).astype(mx.float32)
            kd = mx.dequantize(*[x[..., :t, :] for x in c.keys], group_size=GROUP, bits=bits).astype(mx.float32)
            vd = mx.dequantize(*[x[..., :t, :] for x in c.values], group_size=GROUP, bits=bits).astype(mx.float32)
            ref = mx.fast.scaled_dot_product_attention(q.astype(mx.float32), kd, vd, scale=D ** -0.5)
            err = mx.max(mx.abs(got - ref)).item()
            rel = err / max(mx.max(mx.abs(ref)).item(), 1e-12)
            print(f"  k{bits}v{bits} t={t}: max err {err:.3e} (relative to max |ref| {rel:.3e})")
            print(f"csv: correctness,k{bits}v{bits},{t},{err:.4e},{rel:.4e}")


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def attention_speed():
    depths = [256] if TINY else [32768] if QUICK else [4096, 16384, 32768, 65536, 131072]
    print("\ndecode attention call, 32 q / 8 kv heads, D=128 (batched over N caches per eval)")
    print("csv: attention,depth,config,n_caches,ms_per_call")
    for t in depths:
        n = 2 if TINY else 16 if t <= 32768 else 8
        for bits in (16, 8, 4):
            caches = []
            for _ in range(n):
                c = make_cache(bits)
                fill_cache(c, t)
                caches.append(c)
            q = mx.random.normal((1, HKV * REP, 1, D)).astype(mx.float16)
            times = []
            for i in range(8):
                # Fresh query copies, made before the clock starts: mlx-lm scales them in place.
                qs = [q + 0 for _ in caches]
                mx.eval(qs)
                t0 = time.perf_counter()
                mx.eval([attend(c, qc, bits) for c, qc in zip(caches, qs)])
                if i >= 2:
                    times.append((time.perf_counter() - t0) / n)
            label = "fp16" if bits == 16 else f"k{bits}v{bits}"
            print(f"csv: attention,{t},{label},{n},{median(times) * 1e3:.4f}")
            del caches
            mx.clear_cache()


def random_model():
    layers, hidden, inter, vocab = (2, 512, 1024, 1000) if TINY else (32, 4096, 14336, 128256)
    args = llama.ModelArgs(
        model_type="llama", hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
        num_attention_heads=32, rms_norm_eps=1e-5, vocab_size=vocab, num_key_value_heads=8, head_dim=128,
        rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    )
    t0 = time.perf_counter()
    model = llama.Model(args)
    model.set_dtype(mx.float16)
    nn.quantize(model, group_size=64, bits=4)
    mx.eval(model.parameters())
    print(f"\nrandom {'tiny' if TINY else 'Llama-3.1-8B'} shapes, 4-bit weights, built in {time.perf_counter() - t0:.1f} s")
    return model, args


def prefill_speed(lengths, step=2048):
    model, args = random_model()
    vocab = args.vocab_size
    print("csv: prefill,prompt,config,prefill_tok_per_s,peak_bytes,repeat")
    for n in lengths:
        for bits in (16, 8):
            label = "fp16" if bits == 16 else f"k{bits}v{bits}"
            for rep in range(2):
                tokens = mx.random.randint(0, vocab, (1, n))
                mx.eval(tokens)
                caches = [make_cache(bits) for _ in range(args.num_hidden_layers)]
                mx.clear_cache()
                mx.reset_peak_memory()
                try:
                    t0 = time.perf_counter()
                    done = 0
                    while done < n:
                        m = min(step, n - done)
                        logits = model(tokens[:, done:done + m], cache=caches)
                        mx.eval(logits[:, -1, :], [c.state for c in caches])
                        done += m
                    tps = n / (time.perf_counter() - t0)
                except (RuntimeError, ValueError) as e:
                    print(f"csv: prefill,{n},{label},failed,{str(e)[:80]!r},{rep}")
                    break
                print(f"csv: prefill,{n},{label},{tps:.1f},{mx.get_peak_memory()},{rep}")
                del caches, logits
                mx.clear_cache()


def model_speed():
    model, args = random_model()
    print("csv: model,depth,config,n_gen,decode_tok_per_s")
    depths = [256] if TINY else [32768] if QUICK else [4096, 16384, 32768]
    n_gen = 4 if TINY else 32
    for t in depths:
        for bits in (16, 8, 4):
            caches = [make_cache(bits) for _ in range(args.num_hidden_layers)]
            for c in caches:
                fill_cache(c, t)
            y = mx.array([[1]])
            for _ in range(3):
                y = mx.argmax(model(y, cache=caches)[:, -1, :], axis=-1, keepdims=True)
                mx.eval(y)
            t0 = time.perf_counter()
            for _ in range(n_gen):
                y = mx.argmax(model(y, cache=caches)[:, -1, :], axis=-1, keepdims=True)
                mx.eval(y)
            tps = n_gen / (time.perf_counter() - t0)
            label = "fp16" if bits == 16 else f"k{bits}v{bits}"
            print(f"csv: model,{t},{label},{n_gen},{tps:.2f}")
            del caches
            mx.clear_cache()


if "--prefill" in sys.argv:
    arg = sys.argv[sys.argv.index("--prefill") + 1] if sys.argv.index("--prefill") + 1 < len(sys.argv) else ""
    if not all(x.isdigit() and int(x) > 0 for x in arg.split(",")):
        sys.exit(f"--prefill takes comma-separated positive token counts (e.g. 2048,8192), got {arg!r}")
    prefill_speed([int(x) for x in arg.split(",")])
    sys.exit(0)
correctness()
attention_speed()
try:
    model_speed()
except RuntimeError as e:
    # Decode appends one token at a time, so the cache is a slice of its buffer at once.
    print(f"whole-model decode with mlx-lm's quantized cache failed on this backend: {e}")
