#!/usr/bin/env python3
"""llama.cpp's side of the quality-per-byte comparison (issue #18): perplexity and KL divergence
of llama.cpp's quantized KV cache types against its f16 cache, measured exactly the way
`kvsplit-mlx ppl` measures ours (crates/models/src/perplexity.rs, crates/cli/src/ppl.rs).

Protocol (the same as ours):
  - the text is read as UTF-8 with CRLF turned into LF and tokenized once, by llama.cpp, with the
    model's own special tokens (BOS where the GGUF asks for it) and no parsing of special-token
    text; it is cut into non-overlapping windows of --ctx tokens (a partial last one is dropped),
    the first --max-windows of them;
  - each window starts from an empty cache and is fed in chunks of --chunk tokens (one
    llama_decode call per chunk, n_batch = n_ubatch = chunk), so every chunk after the first
    reads K/V that earlier chunks left in the (quantized) cache. In llama.cpp a chunk's own K/V
    are also written to the cache before attention reads it, so every token attends through
    the quantized cache;
  - the second half of each window is scored (tokens ctx/2 .. ctx-1, each predicted from the
    logits one position earlier), as llama-perplexity does;
  - log-softmax of the full-vocabulary logits in float64; per token NLL, KL(f16 || setting) in
    nats and whether the top-1 token equals the f16 cache's;
  - Δppl% = 100 (exp(mean(nll - nll_f16)) - 1), its standard error 100 exp(d) se(d), and the KLD
    mean with its standard error, both errors from the spread of per-window means (clustered by
    window: a window's tokens are not independent), exactly PplResult::paired.

Every setting runs with flash attention on (llama.cpp needs it for a quantized V cache), the f16
baseline too, so the rows differ from the baseline in the cache type only. llama.cpp 0.3.36
rotates quantized caches by default: with a quantized K cache (head_dim a multiple of 64) it
multiplies Q and K by an orthonormal Walsh-Hadamard matrix (the largest power-of-two block, at
least 64, dividing head_dim) before K is stored; with a quantized V cache it rotates V in blocks
of 64 before storing and rotates the attention output back. LLAMA_ATTN_ROT_DISABLE=1 turns both
off (src/llama-kv-cache.cpp). --rotation off/both measures without it; the rotation llama.cpp
reports for each context is recorded in the rows (kv_rotation).

On the CPU, llama.cpp's flash attention has two kernels. The f16 cache with ubatches of 64 or more
queries takes a tiled one that computes in f32. Every quantized cache type takes the one-query
kernel instead, which rounds Q to K's dot-product type (f16 for an f16 K, 8 bits for a quantized
K) and accumulates the output in f16 when V is f16. So a quantized row's KLD includes that kernel
switch as well as the storage. The extra "kernel floor" row (the baseline cache again, run with
n_ubatch 32 so that it takes the one-query kernel; --no-kernel-floor leaves it out) shows what the
switch alone costs.

Weights stay in llama.cpp's plain CPU buffer (use_extra_bufts = false, what llama-server
--no-repack sets): on this project's Xeon the AMX repack crashes (docs/cpu-side-by-side.md).

Run it with the llama.cpp venv's python (scripts/llamacpp-kld.sh sets the venv up), e.g.
  ~/.cache/kvsplit-mlx-peers/llamacpp-venv/bin/python scripts/llamacpp-kld.py \\
      --model ~/.cache/kvsplit-mlx/models/SmolLM2-135M-Instruct.Q4_1.gguf \\
      --text ../shared/data/wikitext-2-raw/wiki.test.raw --max-windows 16 --out docs/data
"""

import argparse
import ctypes
import datetime
import hashlib
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time

# Bytes per block and elements per block of llama.cpp's KV cache types (ggml's block structs:
# q8_0 = f16 scale + 32 int8; q5_1 = f16 scale + f16 min + 32 high bits + 16 bytes of nibbles;
# q5_0 = as q5_1 without the min; q4_1 = f16 scale + f16 min + 16 bytes; q4_0 = f16 scale + 16).
CACHE_TYPES = {
    "f32": (1, 4),
    "f16": (1, 2),
    "q8_0": (32, 34),
    "q5_1": (32, 24),
    "q5_0": (32, 22),
    "q4_1": (32, 20),
    "q4_0": (32, 18),
}
DEFAULT_SETTINGS = "q8_0,q5_1,q5_0,q4_1,q4_0,q8_0/q4_0,q8_0/q5_0"
# llama.cpp's CPU flash attention takes its tiled kernel (Q, K, V and the accumulator in f32) only
# for f16/f32 caches and ubatches of at least GGML_FA_TILE_Q = 64 queries; otherwise (every
# quantized cache, and decode) it takes the one-query kernel, which rounds Q to K's dot type (f16,
# or 8 bits for quantized K) and, for an f16 V, accumulates the output in f16. The kernel-floor
# row runs the baseline cache with ubatches of FLOOR_UBATCH to show what that switch alone costs.
FA_TILE_Q = 64
FLOOR_UBATCH = 32
# Rows in the f64 log-softmax at a time: bounds the temporaries (Gemma: 262144-token vocabulary).
ROW_BLOCK = 32

COLUMNS = [
    "engine", "version", "model", "model_sha256", "text", "text_sha256", "text_tokens", "ctx", "chunk",
    "windows", "tokens_scored", "baseline", "cache_k", "cache_v", "kv_rotation", "n_ubatch", "bits_k", "bits_v",
    "bits_per_element", "bytes_per_token", "bytes_per_token_llamacpp", "ppl", "ppl_stderr",
    "delta_ppl_pct", "delta_ppl_se_pct", "kld_mean", "kld_se", "kld_p99", "top1_agree",
    "flash_attn", "weights_repack", "n_threads", "machine", "commit", "date", "command", "note",
]


def die(msg):
    sys.exit(f"llamacpp-kld: {msg}")


def say(msg):
    print(f"[llamacpp-kld] {msg}", file=sys.stderr, flush=True)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def parse_pair(flag, item):
    """`q8_0` (K and V) or `q8_0/q4_0` (K/V) -> (k, v)."""
    k, _, v = item.partition("/")
    v = v or k
    for t in (k, v):
        if t not in CACHE_TYPES:
            die(f"{flag}: unknown cache type '{t}' in '{item}' (known: {', '.join(CACHE_TYPES)})")
    return k, v


def parse_settings(spec, rotation, baseline):
    """Comma-separated pairs -> [(k, v, rot_off)], the baseline left out (always measured)."""
    out = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        k, v = parse_pair("--settings", item)
        if (k, v) == baseline:
            continue
        rots = {"on": [False], "off": [True], "both": [False, True]}[rotation]
        for off in rots:
            if (k, v, off) in out:
                die(f"--settings: '{item}' is listed twice")
            out.append((k, v, off))
    if not out:
        die("--settings: no setting to compare with the baseline")
    return out


def bits(t):
    n, b = CACHE_TYPES[t]
    return 8.0 * b / n


class Log:
    """llama.cpp's log: warnings and errors go to stderr; the lines that say which rotation a
    context uses and how large its cache is are kept, so the rows record what llama.cpp did."""

    def __init__(self, L):
        self.lines = []
        self._partial = ""
        self._warned = set()  # one context per setting repeats the same warnings
        self._cb = L.llama_log_callback(self._on)  # kept alive: llama.cpp holds the pointer
        L.llama_log_set(self._cb, None)

    def _on(self, level, text, _user):
        s = self._partial + (text.decode("utf-8", errors="replace") if text else "")
        *done, self._partial = s.split("\n")
        for line in done:
            if "attn_rot_" in line or "llama_kv_cache: size" in line:
                self.lines.append(line)
            if level in (3, 4) and line not in self._warned:  # GGML_LOG_LEVEL_WARN, _ERROR
                self._warned.add(line)
                print(f"[llama.cpp] {line}", file=sys.stderr, flush=True)

    def take(self):
        out, self.lines = self.lines, []
        return out


def meta_str(L, model, key):
    buf = ctypes.create_string_buffer(512)
    n = L.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode() if n >= 0 else None


def tokenize(L, vocab, text):
    data = text.encode("utf-8")
    n = L.llama_tokenize(vocab, data, len(data), None, 0, True, False)
    if n >= 0:
        return []
    toks = (L.llama_token * -n)()
    got = L.llama_tokenize(vocab, data, len(data), toks, -n, True, False)
    if got != -n:
        die(f"llama_tokenize returned {got}, expected {-n}")
    return list(toks)


class Setting:
    """One llama.cpp context with one cache type pair, reused window after window."""

    def __init__(self, L, log, model, k, v, rot_off, ctx, chunk, threads, ubatch=None, note=""):
        self.L, self.k, self.v, self.rot_off, self.note = L, k, v, rot_off, note
        self.ubatch = ubatch or chunk
        if rot_off:
            os.environ["LLAMA_ATTN_ROT_DISABLE"] = "1"  # read once, when the cache is built
        else:
            os.environ.pop("LLAMA_ATTN_ROT_DISABLE", None)
        p = L.llama_context_default_params()
        p.n_ctx = ctx
        p.n_batch = chunk
        p.n_ubatch = self.ubatch
        p.n_seq_max = 1
        p.n_threads = threads
        p.n_threads_batch = threads
        p.type_k = getattr(L, f"GGML_TYPE_{k.upper()}")
        p.type_v = getattr(L, f"GGML_TYPE_{v.upper()}")
        p.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED
        p.no_perf = True
        self.ctx = L.llama_init_from_model(model, p)
        os.environ.pop("LLAMA_ATTN_ROT_DISABLE", None)
        if not self.ctx:
            die(f"llama.cpp could not create a context with K {k} / V {v} (see its log above)")
        self.mem = L.llama_get_memory(self.ctx)
        lines = log.take()
        rk = any("attn_rot_k = 1" in s for s in lines)
        rv = any("attn_rot_v = 1" in s for s in lines)
        self.rotation = {(False, False): "none", (True, False): "K", (False, True): "V", (True, True): "K+V"}[(rk, rv)]
        self.kv_bytes_log = 0.0
        for s in lines:
            # "llama_kv_cache: size =  x MiB ( 512 cells, ...), K (q8_0): y MiB, V (q4_0): z MiB"
            if "llama_kv_cache: size" in s:
                mib = float(s.split("size =")[1].split("MiB")[0])
                cells = int(s.split("(")[1].split("cells")[0])
                self.kv_bytes_log += mib * 1024 * 1024 / cells
        self.name = f"{k}/{v}" + (" no-rot" if rot_off else "") + (f" ubatch {self.ubatch}" if self.ubatch != chunk else "")

    def window_logits(self, window, chunk, first, last, batch, n_vocab):
        """Logit rows at window positions first..last-1 (float32 [last-first, V])."""
        import numpy as np

        L = self.L
        L.llama_memory_clear(self.mem, True)
        rows = []
        for start in range(0, len(window), chunk):
            part = window[start : start + chunk]
            batch.n_tokens = len(part)
            n_out = 0
            for i, tok in enumerate(part):
                pos = start + i
                batch.token[i] = tok
                batch.pos[i] = pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                want = first <= pos < last
                batch.logits[i] = 1 if want else 0
                n_out += want
            rc = L.llama_decode(self.ctx, batch)
            if rc != 0:
                die(f"llama_decode returned {rc} ({self.name}, chunk at {start})")
            if n_out:
                ptr = L.llama_get_logits(self.ctx)
                rows.append(np.ctypeslib.as_array(ptr, shape=(n_out, n_vocab)).copy())
        out = np.concatenate(rows, axis=0)
        if out.shape[0] != last - first or not np.all(np.isfinite(out)):
            die(f"{self.name}: bad logits (shape {out.shape}, finite: {bool(np.all(np.isfinite(out)))})")
        return out

    def free(self):
        self.L.llama_free(self.ctx)


def log_softmax64(x):
    import numpy as np

    x = x.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=1, keepdims=True))
    return x


class Acc:
    """Per-token scores of one setting over windows (PplResult)."""

    def __init__(self):
        self.nll, self.kld, self.top1_same, self.windows = [], [], 0, 0


def score(logits, targets, base=None):
    """NLL per token, top-1 ids and (with `base` = (logprobs, probs, top1) of the baseline)
    KL(base || this) per token, row block by row block in float64."""
    import numpy as np

    nll, kld, lps, top1 = [], [], [], []
    for r in range(0, logits.shape[0], ROW_BLOCK):
        lp = log_softmax64(logits[r : r + ROW_BLOCK])
        t = targets[r : r + ROW_BLOCK]
        nll.append(-lp[np.arange(len(t)), t])
        top1.append(lp.argmax(axis=1))
        if base is None:
            lps.append(lp)
        else:
            blp, bp = base[0][r : r + ROW_BLOCK], base[1][r : r + ROW_BLOCK]
            kld.append((bp * (blp - lp)).sum(axis=1))
    nll, top1 = np.concatenate(nll), np.concatenate(top1)
    if base is None:
        lp = np.concatenate(lps)
        return nll, top1, lp
    return nll, top1, np.concatenate(kld)


def clustered_mean_se(v, per):
    """Mean of `v` and the standard error from the spread of its per-window means (per values
    each); per-value when there is only one window. Same as perplexity.rs clustered_mean_se."""
    import numpy as np

    v = np.asarray(v, dtype=np.float64)
    m = float(v.mean()) if len(v) else float("nan")
    groups = v.reshape(-1, per).mean(axis=1) if per > 0 and len(v) // per >= 2 else v
    if len(groups) < 2:
        return m, float("nan")
    return m, float(np.sqrt(groups.var(ddof=1) / len(groups)))


def paired(acc, base):
    """PplResult::paired: (Δppl%, its se, KLD mean, its se)."""
    import numpy as np

    if len(acc.nll) != len(base.nll) or acc.windows != base.windows or not acc.nll or len(acc.kld) != len(acc.nll):
        return None
    per = len(acc.nll) // max(acc.windows, 1)
    d = np.asarray(acc.nll) - np.asarray(base.nll)
    dm, dse = clustered_mean_se(d, per)
    km, kse = clustered_mean_se(acc.kld, per)
    return 100.0 * math.expm1(dm), 100.0 * math.exp(dm) * dse, km, kse


def ppl_and_se(nll):
    """exp(mean NLL) and ppl · se(NLL) with the per-token standard error (PplResult::ppl_stderr)."""
    import numpy as np

    a = np.asarray(nll, dtype=np.float64)
    p = math.exp(a.mean())
    return p, p * float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else float("nan")


def p99(v):
    """Nearest-rank 99th percentile (perplexity.rs percentile)."""
    s = sorted(v)
    if not s:
        return float("nan")
    return float(s[min(max(math.ceil(0.99 * len(s)), 1), len(s)) - 1])


def git_commit(root):
    try:
        return subprocess.run(["git", "-C", root, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_rows(out_dir, stem, rows, key):
    """CSV + JSON; a row of an existing file measured the same way (`key`) is replaced in its
    place, other new rows are appended."""
    import csv

    os.makedirs(out_dir, exist_ok=True)
    jpath, cpath = os.path.join(out_dir, f"{stem}.json"), os.path.join(out_dir, f"{stem}.csv")
    old = []
    if os.path.isfile(jpath):
        with open(jpath, encoding="utf-8") as f:
            old = json.load(f)
    new = {key(r): r for r in rows}
    merged = [new.pop(key(r), r) for r in old]
    merged += [r for r in rows if key(r) in new]
    with open(jpath, "w", encoding="utf-8") as f:
        json.dump(merged, f, indent=2)
        f.write("\n")
    with open(cpath, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in merged:
            w.writerow(r)
    return cpath, jpath


def fmt_table(rows):
    head = ["K / V", "rotation", "bits/elt", "B/token", "ppl", "Δppl % ± se", "KLD mean ± se", "KLD p99", "top-1 %"]
    body = []
    for r in rows:
        d = "-" if r["delta_ppl_pct"] is None else f"{r['delta_ppl_pct']:+.3f} ± {r['delta_ppl_se_pct']:.3f}"
        k = "-" if r["kld_mean"] is None else f"{r['kld_mean']:.6f} ± {r['kld_se']:.6f}"
        kv = f"{r['cache_k']} / {r['cache_v']}" + (f" (ubatch {r['n_ubatch']})" if r["n_ubatch"] != r["chunk"] else "")
        body.append([kv, r["kv_rotation"], f"{r['bits_per_element']:.2f}",
                     f"{r['bytes_per_token']:.0f}", f"{r['ppl']:.4f}", d, k, f"{r['kld_p99']:.5f}", f"{r['top1_agree']:.2f}"])
    w = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(x)) + " |" for x in [head] + body]
    lines.insert(1, "|" + "|".join("-" * (n + 2) for n in w) + "|")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="GGUF model file")
    ap.add_argument("--text", required=True, help="UTF-8 text to score (e.g. wiki.test.raw); CRLF is read as LF")
    ap.add_argument("--out", default="results", help="directory for llamacpp-kld-<model>[-<text>].csv/.json (default: results)")
    ap.add_argument("--ctx", type=int, default=512, help="tokens per window (default 512)")
    ap.add_argument("--chunk", type=int, default=128, help="tokens per llama_decode call, = n_batch = n_ubatch (default 128)")
    ap.add_argument("--max-windows", type=int, default=16, help="windows to score, from the start of the text (default 16)")
    ap.add_argument("--settings", default=DEFAULT_SETTINGS,
                    help=f"cache types to compare with f16: TYPE (K and V) or K/V, comma-separated (default {DEFAULT_SETTINGS})")
    ap.add_argument("--baseline", default="f16",
                    help="the cache every setting is compared with: TYPE or K/V (default f16, llama.cpp's "
                         "default cache; an f32 cache scores exactly as f16: with flash attention llama.cpp "
                         "casts f32 K/V to f16 before attention)")
    ap.add_argument("--rotation", choices=["on", "off", "both"], default="on",
                    help="llama.cpp's Hadamard rotation of quantized caches: on (its default), off "
                         "(LLAMA_ATTN_ROT_DISABLE=1) or both (each setting twice) (default on)")
    ap.add_argument("--no-kernel-floor", dest="kernel_floor", action="store_false",
                    help="leave out the kernel-floor row (the f16 cache run with n_ubatch 32; see above)")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads (default 2)")
    ap.add_argument("--command-line", default=None, help="the command recorded in the rows (default: this one)")
    args = ap.parse_args()

    if not os.path.isfile(args.model):
        die(f"--model {args.model}: no such file")
    if not os.path.isfile(args.text):
        die(f"--text {args.text}: no such file")
    if args.ctx < 2:
        die(f"--ctx: a window needs at least 2 tokens, got {args.ctx}")
    if args.chunk < 1:
        die("--chunk: must be at least 1")
    if args.max_windows < 1:
        die("--max-windows: must be at least 1")
    if args.threads < 1:
        die("--threads: must be at least 1")
    baseline = parse_pair("--baseline", args.baseline)
    settings = parse_settings(args.settings, args.rotation, baseline)
    try:
        with open(args.text, encoding="utf-8") as f:
            text = f.read().replace("\r\n", "\n")
    except UnicodeDecodeError as e:
        die(f"--text {args.text}: not UTF-8 ({e})")

    import numpy as np
    import llama_cpp as L

    command = args.command_line or " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable), *sys.argv])
    L.llama_backend_init()
    log = Log(L)
    mp = L.llama_model_default_params()
    mp.use_extra_bufts = False
    say(f"loading {args.model}")
    model = L.llama_model_load_from_file(args.model.encode(), mp)
    if not model:
        die(f"--model {args.model}: llama.cpp could not load it")
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    arch = meta_str(L, model, "general.architecture")
    n_layer = L.llama_model_n_layer(model)
    n_kv = L.llama_model_n_head_kv(model)
    default_hd = L.llama_model_n_embd(model) // L.llama_model_n_head(model)
    dk = int(meta_str(L, model, f"{arch}.attention.key_length") or default_hd)
    dv = int(meta_str(L, model, f"{arch}.attention.value_length") or default_hd)

    t0 = time.time()
    tokens = tokenize(L, vocab, text)
    bos = "BOS prepended" if L.llama_vocab_get_add_bos(vocab) else "no BOS"
    n_all = len(tokens) // args.ctx
    n = min(n_all, args.max_windows)
    if n == 0:
        die(f"--ctx: the text has {len(tokens)} tokens, fewer than one window of {args.ctx}")
    first, last = args.ctx // 2 - 1, args.ctx - 1  # logit positions; targets ctx/2 .. ctx-1
    say(f"text {args.text}: {len(text.encode())} bytes (CRLF -> LF), {len(tokens)} tokens ({bos}, "
        f"tokenized in {time.time() - t0:.1f} s)")
    say(f"model {arch}: {n_layer} layers, {n_kv} KV heads, head_dim K {dk} / V {dv}, vocab {n_vocab}")
    base_name = "/".join(baseline)
    say(f"protocol: {n} of {n_all} windows of {args.ctx} tokens, chunks of {args.chunk}, scored "
        f"{last - first} tokens/window (second half), baseline {base_name}, flash attention on, {args.threads} threads")

    base = Setting(L, log, model, *baseline, False, args.ctx, args.chunk, args.threads)
    runs = [Setting(L, log, model, k, v, off, args.ctx, args.chunk, args.threads) for k, v, off in settings]
    if args.kernel_floor:
        if args.chunk < FA_TILE_Q or baseline[1] not in ("f16", "f32"):
            say(f"no kernel-floor row: the baseline itself takes the non-tiled kernel (--chunk below {FA_TILE_Q} or a quantized baseline)")
        else:
            runs.append(Setting(L, log, model, *baseline, False, args.ctx, args.chunk, args.threads, ubatch=FLOOR_UBATCH,
                                note=f"kernel floor: the baseline cache through the non-tiled CPU flash-attention kernel "
                                     f"(n_ubatch {FLOOR_UBATCH}) that every quantized cache type takes"))
    for s in runs:
        say(f"context {s.name}: llama.cpp rotation {s.rotation}")
    batch = L.llama_batch_init(args.chunk, 0, 1)
    acc_base, accs = Acc(), [Acc() for _ in runs]
    t_start = time.time()
    for w in range(n):
        window = tokens[w * args.ctx : (w + 1) * args.ctx]
        targets = np.asarray(window[first + 1 : last + 1])
        logits = base.window_logits(window, args.chunk, first, last, batch, n_vocab)
        bnll, btop, blp = score(logits, targets)
        bp = np.exp(blp)
        acc_base.nll.extend(bnll.tolist())
        acc_base.kld.extend([0.0] * len(bnll))
        acc_base.top1_same += len(bnll)
        acc_base.windows += 1
        for s, acc in zip(runs, accs):
            logits = s.window_logits(window, args.chunk, first, last, batch, n_vocab)
            nll, top1, kld = score(logits, targets, (blp, bp))
            acc.nll.extend(nll.tolist())
            acc.kld.extend(kld.tolist())
            acc.top1_same += int((top1 == btop).sum())
            acc.windows += 1
        del blp, bp, logits
        el = time.time() - t_start
        say(f"window {w + 1}/{n} done: {el:.0f} s elapsed, about {el / (w + 1) * (n - w - 1):.0f} s left; "
            f"mean KLD so far {', '.join(f'{s.name} {np.mean(a.kld):.5f}' for s, a in zip(runs, accs))}")
    L.llama_batch_free(batch)
    for s in [base, *runs]:
        s.free()
    L.llama_model_free(model)

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    common = {
        "engine": "llama.cpp",
        "version": f"llama-cpp-python {L.__version__}",
        "model": os.path.basename(args.model),
        "model_sha256": sha256(args.model),
        "text": os.path.basename(args.text),
        "text_sha256": sha256(args.text),
        "text_tokens": len(tokens),
        "ctx": args.ctx,
        "chunk": args.chunk,
        "windows": n,
        "baseline": base_name,
        "flash_attn": "on",
        "weights_repack": "off (use_extra_bufts=false)",
        "n_threads": args.threads,
        "machine": cpu_name(),
        "commit": git_commit(os.path.dirname(os.path.abspath(__file__))),
        "date": date,
        "command": command,
    }
    rows = []
    for s, acc in [(base, acc_base), *zip(runs, accs)]:
        p, pse = ppl_and_se(acc.nll)
        pr = paired(acc, acc_base) if s is not base else (0.0, 0.0, 0.0, 0.0)
        bpt = n_layer * n_kv * (dk * CACHE_TYPES[s.k][1] / CACHE_TYPES[s.k][0] + dv * CACHE_TYPES[s.v][1] / CACHE_TYPES[s.v][0])
        if s.kv_bytes_log and abs(s.kv_bytes_log - bpt) > 0.01 * bpt:
            say(f"WARNING {s.name}: llama.cpp reports {s.kv_bytes_log:.0f} cache bytes/token, the block sizes give {bpt:.0f}")
        rows.append({
            **common,
            "tokens_scored": len(acc.nll),
            "cache_k": s.k,
            "cache_v": s.v,
            "kv_rotation": s.rotation,
            "n_ubatch": s.ubatch,
            "note": s.note,
            "bits_k": bits(s.k),
            "bits_v": bits(s.v),
            "bits_per_element": 8.0 * bpt / (n_layer * n_kv * (dk + dv)),
            "bytes_per_token": bpt,
            "bytes_per_token_llamacpp": round(s.kv_bytes_log, 1),
            "ppl": p,
            "ppl_stderr": pse,
            "delta_ppl_pct": pr[0] if pr else None,
            "delta_ppl_se_pct": pr[1] if pr else None,
            "kld_mean": pr[2] if pr else None,
            "kld_se": pr[3] if pr else None,
            "kld_p99": p99(acc.kld),
            "top1_agree": 100.0 * acc.top1_same / max(len(acc.nll), 1),
        })
    stem = os.path.splitext(os.path.basename(args.model))[0]
    text_stem = os.path.splitext(os.path.basename(args.text))[0]
    if text_stem != "wiki.test":
        stem = f"{stem}-{text_stem}"
    key = lambda r: (r["model"], r["text"], r["ctx"], r["chunk"], r["windows"], r["baseline"], r["cache_k"], r["cache_v"], r["kv_rotation"], r["n_ubatch"])
    cpath, jpath = write_rows(args.out, f"llamacpp-kld-{stem}", rows, key)
    print(f"llama.cpp (llama-cpp-python {L.__version__}), {os.path.basename(args.model)}, {os.path.basename(args.text)}: "
          f"{n} windows x {last - first} scored tokens, ctx {args.ctx}, chunk {args.chunk}")
    print(fmt_table(rows))
    print(f"paired errors: the same tokens under both caches, clustered by window; KLD = KL({base_name} || setting) in nats")
    print(f"wrote {cpath} and {jpath}")


if __name__ == "__main__":
    main()
