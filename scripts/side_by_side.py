#!/usr/bin/env python3
"""Side-by-side CPU benchmark for issue #8: kvsplit-mlx vs llama.cpp vs mlx-lm, same workload.

scripts/cpu-side-by-side.sh prepares everything (build, peer venvs, converted weights) and then
runs `side_by_side.py report`, which runs each engine in its own process, one after another, on
this machine:
  - kvsplit-mlx `bench` (its own CSV/JSON rows);
  - `side_by_side.py llamacpp` under the llama-cpp-python venv;
  - `side_by_side.py mlxlm` under the mlx-lm venv.
Each peer prints one JSON object with its rows; `report` writes the ratio table.

The prompt is the same for all three: the first N tokens of WikiText-2's test split, taken the
way `kvsplit-mlx bench` takes them (tokenize the first 8*N bytes, keep N tokens, repeat the text
when it is too short). The peers tokenize with their own tokenizers; both print a hash of the ids
so the report can say whether they got the same prompt (ours uses the GGUF tokenizer, whose ids
match llama.cpp's in tests/fixtures).
"""

import argparse
import hashlib
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time

# The targets, checked in the report.
TARGET_PREFILL_TPS = 50.0
TARGET_MLXLM_FACTOR = 3.0


def prompt_text(path, n):
    """The text `kvsplit-mlx bench` tokenizes for n tokens (see text_tokens in bench.rs)."""
    data = open(path, "rb").read()
    end = min(n * 8, len(data))
    while end < len(data) and (data[end] & 0xC0) == 0x80:  # to a UTF-8 character boundary
        end += 1
    return data[:end].decode("utf-8")


def take(ids, n):
    return [ids[i % len(ids)] for i in range(n)]


def ids_hash(ids):
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]


def median(xs):
    return statistics.median(xs) if xs else float("nan")


# --- llama.cpp (runs under the llama-cpp-python venv) ----------------------------------------
def run_llamacpp(a):
    import ctypes

    import llama_cpp
    import numpy as np

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import llamacpp_no_repack

    # llama.cpp's AMX weight repack crashes on this project's Xeon: plain CPU buffers, as
    # `llama-server --no-repack` (the CPU kernels are AVX-512 either way).
    llamacpp_no_repack.install()
    threads = os.cpu_count()
    types = {"f16": (llama_cpp.GGML_TYPE_F16, llama_cpp.GGML_TYPE_F16),
             "q8_0/q4_0": (llama_cpp.GGML_TYPE_Q8_0, llama_cpp.GGML_TYPE_Q4_0)}
    settings = [(name, *types[name]) for name in a.llamacpp_caches]
    rows = []
    for name, tk, tv in settings:
        # flash_attn: llama.cpp refuses a quantized V cache without it; on for both rows so
        # that they differ only in the cache types.
        llm = llama_cpp.Llama(model_path=a.gguf, n_ctx=a.prompt_tokens + a.gen + 64, n_threads=threads,
                              n_threads_batch=threads, type_k=tk, type_v=tv, flash_attn=True, verbose=False)
        ids = take(llm.tokenize(prompt_text(a.text, a.prompt_tokens).encode(), add_bos=False), a.prompt_tokens)
        n_vocab = llm.n_vocab()
        ctx = llm._ctx.ctx

        def forward(tokens):
            llm.eval(tokens)
            llama_cpp.llama_synchronize(ctx)  # count the whole forward pass, not a queued one

        def greedy():
            # Host-side argmax over the last logits: the "sampler", kept out of the timed region.
            return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))))

        def once(prompt, gen):
            llm.reset()  # next eval starts at position 0 and drops the old cache entries
            llama_cpp.llama_perf_context_reset(ctx)
            t0 = time.perf_counter()
            forward(prompt)
            prefill_s = time.perf_counter() - t0
            decode_s = 0.0
            tok = greedy()
            for _ in range(gen):
                t = time.perf_counter()
                forward([tok])
                decode_s += time.perf_counter() - t
                tok = greedy()
            perf = llama_cpp.llama_perf_context(ctx)
            return {"prefill_tps": len(prompt) / prefill_s, "decode_tps": gen / decode_s,
                    "perf_prefill_tps": perf.n_p_eval / (perf.t_p_eval_ms / 1e3) if perf.t_p_eval_ms else None,
                    "perf_decode_tps": perf.n_eval / (perf.t_eval_ms / 1e3) if perf.t_eval_ms else None}

        once(ids[:32], 4)  # warm-up: first-use costs (thread pool, buffers) stay out
        samples = [once(ids, a.gen) for _ in range(a.repeats)]
        rows.append({"engine": "llama.cpp", "cache": name, "prompt_tokens": len(ids), "gen_tokens": a.gen,
                     "repeats": a.repeats, "prompt_ids_hash": ids_hash(ids),
                     "prefill_tps": median([s["prefill_tps"] for s in samples]),
                     "decode_tps": median([s["decode_tps"] for s in samples]),
                     "perf_prefill_tps": median([s["perf_prefill_tps"] for s in samples if s["perf_prefill_tps"]]),
                     "perf_decode_tps": median([s["perf_decode_tps"] for s in samples if s["perf_decode_tps"]]),
                     "samples": samples,
                     "settings": f"n_ctx={llm.n_ctx()} n_batch={llm.n_batch} n_ubatch={llm.context_params.n_ubatch} "
                                 f"n_threads={threads} flash_attn=True use_extra_bufts=False type_k/type_v={name}"})
        del llm
    info = {"llama_cpp_python": llama_cpp.__version__,
            "system_info": llama_cpp.llama_print_system_info().decode().strip(),
            "blas": "ggml's own CPU kernels (no BLAS backend in this build)"}
    print(json.dumps({"info": info, "rows": rows}))


# --- mlx-lm (runs under the mlx-lm venv) -------------------------------------------------------
def loaded_blas():
    """Which BLAS MLX mapped: the swapped OpenBLAS or the wheel's reference BLAS. Only the
    wheel's mlx_cpu.libs counts: numpy maps an OpenBLAS of its own that MLX does not call."""
    import mlx.core as mx

    libs_dir = os.path.join(os.path.dirname(os.path.dirname(mx.__file__)), "mlx_cpu.libs")
    libs = sorted({line.split()[-1] for line in open("/proc/self/maps") if libs_dir in line and "blas" in line})
    kind = "OpenBLAS" if any("openblas" in p for p in libs) else "reference BLAS (bundled with the mlx-cpu wheel)"
    core = os.environ.get("OPENBLAS_CORETYPE")
    kernels = f", OPENBLAS_CORETYPE={core}" if core and kind == "OpenBLAS" else ""
    return f"{kind} ({', '.join(os.path.basename(p) for p in libs)}{kernels})"


def run_mlxlm(a):
    import importlib.metadata as md

    import mlx.core as mx
    from mlx_lm import load, stream_generate

    model, tok = load(a.mlx_dir)
    tok.eos_token_ids = set()  # always generate exactly --gen tokens, as the other two do
    ids = take(tok.encode(prompt_text(a.text, a.prompt_tokens), add_special_tokens=False), a.prompt_tokens)
    settings = [("dense", {}), ("8-bit", {"kv_bits": 8, "kv_group_size": 64, "quantized_kv_start": 0})]

    def once(prompt, gen, kw):
        last = None
        for last in stream_generate(model, tok, mx.array(prompt), max_tokens=gen, **kw):
            pass
        mx.clear_cache()
        return {"prefill_tps": last.prompt_tps, "decode_tps": last.generation_tps,
                "generation_tokens": last.generation_tokens, "peak_memory_gb": last.peak_memory}

    rows = []
    for name, kw in settings:
        once(ids[:32], 4, kw)  # warm-up
        samples = [once(ids, a.gen, kw) for _ in range(a.repeats)]
        rows.append({"engine": "mlx-lm", "cache": name, "prompt_tokens": len(ids), "gen_tokens": a.gen,
                     "repeats": a.repeats, "prompt_ids_hash": ids_hash(ids),
                     "prefill_tps": median([s["prefill_tps"] for s in samples]),
                     "decode_tps": median([s["decode_tps"] for s in samples]),
                     "samples": samples,
                     "settings": "stream_generate, greedy, prefill_step_size=2048 (default)"
                                 + "".join(f" {k}={v}" for k, v in kw.items())})
    mx.eval(mx.ones((64, 64)) @ mx.ones((64, 64)))  # BLAS is mapped by now
    info = {"mlx": mx.__version__, "mlx_lm": md.version("mlx-lm"), "device": str(mx.default_device()),
            "blas": loaded_blas()}
    print(json.dumps({"info": info, "rows": rows}))


# --- report (orchestrator, stdlib only) ---------------------------------------------------------
def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw).stdout


def loadavg():
    return open("/proc/loadavg").read().strip()


def lscpu_model():
    for line in sh(["lscpu"]).splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def peer(python, mode, a, extra):
    """Runs one peer in its venv; its last stdout line is the JSON result."""
    cmd = [python, os.path.abspath(__file__), mode, "--text", a.text, "--prompt-tokens", str(a.prompt_tokens),
           "--gen", str(a.gen), "--repeats", str(a.repeats)] + extra
    print(f"[side-by-side] {shlex.join(cmd)}", file=sys.stderr, flush=True)
    out = subprocess.run(cmd, check=True, text=True, stdout=subprocess.PIPE).stdout
    return cmd, json.loads(out.strip().splitlines()[-1])


def ratio(ours, theirs):
    return f"{ours / theirs:.2f}x" if ours and theirs else "–"


def report(a):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    data_dir = os.path.join(a.out, "data")
    os.makedirs(data_dir, exist_ok=True)
    stem = a.stem
    load_before = loadavg()
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    rows, info, commands = [], {}, []

    # Ours first: the bench loads once, warms up every setting, then measures.
    cmd = [a.bin, "bench", "--model", a.gguf, "--kv", "fp16,k8v4", "--kv-plain", "-d", "0", "-p", str(a.prompt_tokens),
           "-n", str(a.gen), "-r", str(a.repeats), "--text", a.text, "--out", data_dir, "--name", f"{stem}-kvsplit"]
    print(f"[side-by-side] {shlex.join(cmd)}", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, stdout=sys.stderr)
    commands.append(cmd)
    ours = json.load(open(os.path.join(data_dir, f"{stem}-kvsplit.json")))
    for r in ours:
        rows.append({"engine": "kvsplit-mlx", "cache": r["kv"], "prompt_tokens": r["n_prompt"], "gen_tokens": r["n_gen"],
                     "repeats": r["repeats"], "prefill_tps": r["prefill_tps_median"], "decode_tps": r["decode_tps_median"],
                     "settings": "bench, prefill_step=512 (default)" + ("; 16-bit floats (f16 on CPU, widened in the decode primitive)" if r["kv"] == "fp16" else "")})
    info["kvsplit"] = {"mlx": ours[0]["mlx_version"], "commit": ours[0]["commit"], "blas": a.our_blas}

    caches = ["--llamacpp-caches", ",".join(a.llamacpp_caches)]
    for mode, python, extra, skip in (("llamacpp", a.llamacpp_python, ["--gguf", a.gguf] + caches, a.skip_llamacpp),
                                      ("mlxlm", a.mlxlm_python, ["--mlx-dir", a.mlx_dir], a.skip_mlxlm)):
        if skip:
            continue
        cmd, res = peer(python, mode, a, extra)
        commands.append(cmd)
        rows += res["rows"]
        info[mode] = res["info"]
    load_after = loadavg()

    with open(os.path.join(data_dir, f"{stem}.json"), "w") as f:
        json.dump({"rows": rows, "info": info, "load_before": load_before, "load_after": load_after,
                   "date": started, "commands": [shlex.join(c) for c in commands]}, f, indent=2)
    cols = ["engine", "cache", "prompt_tokens", "gen_tokens", "repeats", "prefill_tps", "decode_tps", "settings"]
    with open(os.path.join(data_dir, f"{stem}.csv"), "w") as f:
        import csv

        w = csv.DictWriter(f, cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)

    get = lambda e, c: next((r for r in rows if r["engine"] == e and r["cache"] == c), None)  # noqa: E731
    k8v4, fp16 = get("kvsplit-mlx", "k8v4"), get("kvsplit-mlx", "fp16")
    # ms per decoded token: the decode steps run at depth prompt..prompt+gen, so comparing these
    # columns across runs of several prompt lengths shows how each engine's step grows with depth.
    lines = ["| engine | KV cache | prefill tok/s | decode tok/s | decode ms/token | our K8V4 prefill ÷ this | our K8V4 decode ÷ this |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['engine']} | {r['cache']} | {r['prefill_tps']:.1f} | {r['decode_tps']:.2f} | "
                     f"{1e3 / r['decode_tps']:.1f} | "
                     f"{ratio(k8v4['prefill_tps'], r['prefill_tps'])} | {ratio(k8v4['decode_tps'], r['decode_tps'])} |")

    def check(label, ok, detail):
        return f"- {'met' if ok else '**not met**'}: {label} ({detail})"

    targets = [check(f"K8V4 prefill ≥ {TARGET_PREFILL_TPS:.0f} tok/s", k8v4["prefill_tps"] >= TARGET_PREFILL_TPS,
                     f"{k8v4['prefill_tps']:.1f} tok/s"),
               check("K8V4 decode ≥ our dense-cache decode", k8v4["decode_tps"] >= fp16["decode_tps"],
                     f"{k8v4['decode_tps']:.2f} vs {fp16['decode_tps']:.2f} tok/s")]
    if (f := get("llama.cpp", "f16")):
        targets.append(check(f"K8V4 prefill ≥ llama.cpp f16-cache prefill (#20)", k8v4["prefill_tps"] >= f["prefill_tps"],
                             f"{ratio(k8v4['prefill_tps'], f['prefill_tps'])}"))
        targets.append(check(f"K8V4 decode ≥ {a.f16_decode_factor:g}× llama.cpp f16-cache decode (#20)",
                             k8v4["decode_tps"] >= a.f16_decode_factor * f["decode_tps"],
                             f"{ratio(k8v4['decode_tps'], f['decode_tps'])}"))
    if (q := get("llama.cpp", "q8_0/q4_0")):
        targets.append(check("K8V4 decode ≥ llama.cpp q8_0 K / q4_0 V decode", k8v4["decode_tps"] >= q["decode_tps"],
                             f"{k8v4['decode_tps']:.2f} vs {q['decode_tps']:.2f} tok/s, {ratio(k8v4['decode_tps'], q['decode_tps'])}"))
    for ours_row, peer_cache in ((k8v4, "8-bit"), (fp16, "dense")):
        if (m := get("mlx-lm", peer_cache)):
            for what in ("prefill", "decode"):
                o, t = ours_row[f"{what}_tps"], m[f"{what}_tps"]
                targets.append(check(f"{ours_row['cache']} {what} ≥ {TARGET_MLXLM_FACTOR:.0f}× mlx-lm {peer_cache} cache",
                                     o >= TARGET_MLXLM_FACTOR * t, f"{ratio(o, t)}"))

    hashes = {r["engine"]: r["prompt_ids_hash"] for r in rows if "prompt_ids_hash" in r}
    same_prompt = ("llama.cpp and mlx-lm tokenized the prompt to identical ids" if len(set(hashes.values())) == 1
                   else f"prompt id hashes differ between peers: {hashes}") if len(hashes) > 1 else ""
    la_b, la_a = float(load_before.split()[0]), float(load_after.split()[0])
    cores = os.cpu_count()
    # Only the load before counts: our own engines' threads raise the 1-minute average by the end.
    loaded = la_b > 0.5 * cores
    blas = [f"kvsplit-mlx: {info['kvsplit']['blas']}"]
    if "mlxlm" in info:
        blas.append(f"mlx-lm: {info['mlxlm']['blas']}")
    if "llamacpp" in info:
        blas.append(f"llama.cpp: {info['llamacpp']['blas']}")
    md_lines = [
        "# CPU side by side: kvsplit-mlx vs llama.cpp vs mlx-lm (issues #8 and #20)",
        "",
        f"Generated by `scripts/cpu-side-by-side.sh` on {started}; commit {info['kvsplit']['commit']}.",
        f"Workload: {os.path.basename(a.gguf)}, a {a.prompt_tokens}-token prompt from WikiText-2 test "
        f"(`{os.path.relpath(a.text, root) if a.text.startswith(root) else a.text}`), {a.gen} greedy tokens, "
        f"median of {a.repeats} repeat(s) after a warm-up, all engines one after another on the same machine.",
        "",
    ]
    if loaded:
        md_lines += [f"**The machine was loaded by other jobs during this run** (load average {la_b:.2f} before, "
                     f"{la_a:.2f} after, on {cores} cores): every number below is pessimistic and noisy, "
                     "and the engines did not necessarily see the same load. llama.cpp runs one thread per "
                     "core and its threads wait for each other by spinning, so it likely loses the most to "
                     "other jobs.", ""]
    md_lines += lines + ["", "Targets (#8, and #20's against llama.cpp's f16 cache):", ""] + targets + [
        "",
        "## How each number is measured",
        "- kvsplit-mlx: `bench` rows (prefill: timed prefill of the prompt in 512-token chunks; decode: "
        "steps ÷ time of the whole greedy loop, pipelined as `generate` runs it: the next step's graph is "
        "built while the current one runs; `bench --sync-decode` times one step at a time). `fp16` stores 16-bit floats on every backend (on the CPU f16, widened inside our decode primitive; f32 before commit 32e7552).",
        "- llama.cpp: wall clock around `Llama.eval` of the prompt (batches of n_batch) and around each "
        "single-token `Llama.eval` + `llama_synchronize`; the host argmax that picks the next token is "
        "outside the timed region. llama.cpp's own perf counters are in the JSON (`perf_*_tps`).",
        "- mlx-lm: `prompt_tps` and `generation_tps` of the last `GenerationResponse` of `stream_generate`, "
        "as mlx-lm reports them (generation_tps counts the first token, produced by prefill, in its "
        f"numerator but not its time: about {a.gen / max(a.gen - 1, 1):.3f}× optimistic at {a.gen} tokens). "
        "Weights: our `convert --dequantize --dtype f32` of the same GGUF.",
        "",
        "## Machine and versions",
        f"- CPU: {lscpu_model()}, {cores} cores; /proc/loadavg before: `{load_before}`, after: `{load_after}`",
        f"- MLX (ours): {info['kvsplit']['mlx']}"
        + (f"; MLX (mlx-lm venv): {info['mlxlm']['mlx']}, mlx-lm {info['mlxlm']['mlx_lm']}, {info['mlxlm']['device']}"
           if "mlxlm" in info else ""),
        "- BLAS: " + "; ".join(blas),
    ]
    if "llamacpp" in info:
        md_lines.append(f"- llama-cpp-python {info['llamacpp']['llama_cpp_python']}: `{info['llamacpp']['system_info']}`")
    if same_prompt:
        md_lines.append(f"- Prompt: {same_prompt}")
    md_lines += ["", "Per-row settings:", ""] + [f"- {r['engine']} {r['cache']}: {r['settings']}" for r in rows]
    md_lines += ["", "## Commands", "", "```", a.command_line] + [shlex.join(c) for c in commands] + ["```", "",
                 f"Raw rows: `data/{stem}.csv`, `data/{stem}.json`, and our bench's own `data/{stem}-kvsplit.*`.", ""]
    md = os.path.join(a.out, f"{stem}.md")
    with open(md, "w") as f:
        f.write("\n".join(md_lines))
    print("\n".join(lines + [""] + targets))
    print(f"[side-by-side] wrote {md} and {data_dir}/{stem}.{{csv,json}}", file=sys.stderr)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["report", "llamacpp", "mlxlm"])
    p.add_argument("--text", required=True, help="WikiText-2 raw test file")
    p.add_argument("--prompt-tokens", type=int, default=4000)
    p.add_argument("--gen", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--gguf", help="the GGUF model (ours and llama.cpp)")
    p.add_argument("--mlx-dir", help="our convert's MLX directory of the same model (mlx-lm)")
    p.add_argument("--bin", help="kvsplit-mlx binary")
    p.add_argument("--our-blas", default="unknown", help="which BLAS our binary's libmlx.so loads")
    p.add_argument("--llamacpp-python")
    p.add_argument("--mlxlm-python")
    p.add_argument("--skip-llamacpp", action="store_true")
    p.add_argument("--skip-mlxlm", action="store_true")
    p.add_argument("--out", default="docs", help="markdown here, raw rows under OUT/data")
    p.add_argument("--command-line", default="", help="the wrapper's command line, for the doc")
    p.add_argument("--stem", default="cpu-side-by-side", help="file name stem of the doc and data files")
    p.add_argument("--llamacpp-caches", default="f16,q8_0/q4_0",
                   help="comma-separated llama.cpp cache settings to run: f16, q8_0/q4_0")
    p.add_argument("--f16-decode-factor", type=float, default=1.0,
                   help="#20's target: our K8V4 decode ≥ this × llama.cpp's f16-cache decode")
    a = p.parse_args()
    for flag in ("prompt_tokens", "gen", "repeats"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')}: must be at least 1")
    a.llamacpp_caches = [c for c in a.llamacpp_caches.split(",") if c]
    for c in a.llamacpp_caches:
        if c not in ("f16", "q8_0/q4_0"):
            p.error(f"--llamacpp-caches: unknown cache setting '{c}' (known: f16, q8_0/q4_0)")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", a.stem):
        p.error(f"--stem: letters, digits, '.', '_' and '-' only, got '{a.stem}'")
    {"report": report, "llamacpp": run_llamacpp, "mlxlm": run_mlxlm}[a.mode](a)


if __name__ == "__main__":
    main()
