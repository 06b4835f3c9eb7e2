"""Serve benchmark against a running OpenAI-compatible server (loopback only): `kvsplit-mlx serve`
or a peer (mlx_lm.server, llama-cpp-python's server).

    python serve_bench.py ttft URL TEXT_FILE TOKENS [KV] [--tag JSON] [--llamacpp-log FILE]
        turn-1 and turn-2 time to first token, and decode tok/s, of one two-turn chat
    python serve_bench.py kept URL TEXT_FILE TOKENS N KV
        how many N distinct conversations stay kept (kvsplit-mlx only: reads its /metrics)

KV is sent as the request's `kv` field (our extension); `-` sends none, for peers. --tag puts the
fields of a JSON object first in the row (the engine, its version and cache setting).

Every number in a ttft row is measured by this client the same way for every engine: time to
first token is from sending the request to the first streamed chunk with content; decode tok/s
is (content chunks - 1) / (arrival of the last content chunk - arrival of the first), so the
first token, which prefill produces, is in neither. All three servers stream one chunk per
generated token that has text (the end-of-turn token has none; mlx_lm.server leaves out the last
token's text at a max_tokens stop), so this is their token rate; `chunks_turn*` beside
`completion_tokens_turn*` (from usage, where sent) or llama.cpp's eval runs checks it. Server-side extensions are recorded beside, never used for the client numbers:
our `kv_cache`/`timings`, OpenAI's usage.prompt_tokens_details.cached_tokens (mlx_lm.server),
and, for llama-cpp-python, whose stream has no usage, its verbose log (--llamacpp-log): the
"N prefix-match hit, remaining M prompt tokens to eval" line of each request.

Prints one JSON line per measurement.
"""
import json
import os
import re
import sys
import time
import urllib.request


def post_stream(url, body):
    """Streams a chat completion. Returns a dict: ttft (seconds from sending to the first chunk
    with content), times (arrival of every content chunk, seconds from sending), text, usage
    (the last usage object seen, or None), last (the event that carried it)."""
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    t0 = time.monotonic()
    times, text, last = [], [], None
    with urllib.request.urlopen(req, timeout=900) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                raise SystemExit(f"server error: {ev['error']}")
            for c in ev.get("choices", []):
                piece = (c.get("delta") or {}).get("content")
                if piece:
                    times.append(time.monotonic() - t0)
                    text.append(piece)
            if ev.get("usage"):
                last = ev
    if not times:
        raise SystemExit("the server streamed no content")
    return {"ttft": times[0], "times": times, "text": "".join(text), "usage": (last or {}).get("usage"), "last": last}


def decode_tps(times):
    return round((len(times) - 1) / (times[-1] - times[0]), 2) if len(times) > 1 and times[-1] > times[0] else None


def metric(url, name):
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])


def words(path, n_words, skip=0):
    w = open(path, encoding="utf-8").read().split()
    return " ".join(w[skip : skip + n_words])


class LlamaCppLog:
    """What llama-cpp-python's verbose server log says about each request's prompt: the log is
    read from where the previous request left it."""

    def __init__(self, path):
        self.path, self.pos = path, os.path.getsize(path) if path else 0

    def next(self):
        """(prompt tokens, tokens reused from the context, single-token evaluations after the
        first token) of the request since the last call, or Nones. Without a prefix-match line
        the whole prompt was evaluated; its size is then the `prompt eval time = ... / N tokens`
        of llama.cpp's perf print, whose `eval time = ... / R runs` gives the third number."""
        if not self.path:
            return None, None, None
        time.sleep(0.5)  # the server prints after the last chunk is sent
        with open(self.path, encoding="utf-8", errors="replace") as f:
            f.seek(self.pos)
            new = f.read()
            self.pos = f.tell()
        runs = re.findall(r" eval time =\s*[\d.]+ ms /\s*(\d+) runs", new)
        runs = int(runs[-1]) if runs else None
        hit = re.findall(r"(\d+) prefix-match hit, remaining (\d+) prompt tokens to eval", new)
        if hit:
            reused, rest = map(int, hit[-1])
            return reused + rest, reused, runs
        evald = re.findall(r"prompt eval time =\s*[\d.]+ ms /\s*(\d+) tokens", new)
        return (int(evald[-1]), 0, runs) if evald else (None, None, runs)


def take_opt(args, name):
    if name in args:
        i = args.index(name)
        value = args[i + 1]
        del args[i : i + 2]
        return value
    return None


args = sys.argv[1:]
tag = json.loads(take_opt(args, "--tag") or "{}")
# --warmup: the same two-turn exchange on another stretch of the text first, unmeasured, so
# first-use costs (GPU kernels compiled on first use of each shape) stay out of the numbers.
warmup = "--warmup" in args
args = [a for a in args if a != "--warmup"]
llama_log = LlamaCppLog(take_opt(args, "--llamacpp-log"))
mode, url, text_file, tokens = args[0], args[1].rstrip("/"), args[2], int(args[3])
# About 0.83 words a token for WikiText with SmolLM2's vocabulary (measured: 2,720 words gave
# 3,286 prompt tokens with the chat template).
n_words = int(tokens * 0.83)
if mode == "ttft":
    kv = args[4] if len(args) > 4 else "k8v4"
    def exchange_body(doc):
        msgs = [{"role": "user", "content": "Summarize this article in one sentence.\n\n" + doc}]
        body = {"messages": msgs, "max_tokens": 32, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        if kv != "-":
            body["kv"] = kv
        return msgs, body

    if warmup:
        wmsgs, wbody = exchange_body(words(text_file, n_words, skip=4 * n_words))
        w1 = post_stream(url, wbody)
        llama_log.next()
        post_stream(url, {**wbody, "messages": wmsgs + [{"role": "assistant", "content": w1["text"]}, {"role": "user", "content": "Now name one person it mentions."}]})
        llama_log.next()
    msgs, body = exchange_body(words(text_file, n_words))
    r1 = post_stream(url, body)
    log1 = llama_log.next()
    msgs2 = msgs + [{"role": "assistant", "content": r1["text"]}, {"role": "user", "content": "Now name one person it mentions."}]
    r2 = post_stream(url, {**body, "messages": msgs2})
    log2 = llama_log.next()
    u1, u2 = r1["usage"] or {}, r2["usage"] or {}
    ours = r2["last"] or {}
    if "kv_cache" in ours:  # kvsplit-mlx
        cached, cached_from = ours["kv_cache"]["cached_tokens"], "kvsplit-mlx kv_cache.cached_tokens"
    elif "cached_tokens" in (u2.get("prompt_tokens_details") or {}):  # OpenAI's field (mlx_lm.server)
        cached, cached_from = u2["prompt_tokens_details"]["cached_tokens"], "usage.prompt_tokens_details.cached_tokens"
    elif log2[1] is not None:
        cached, cached_from = log2[1], "llama-cpp-python log: prefix-match hit"
    else:
        cached, cached_from = None, "not reported"
    row = {**tag, "measure": "ttft", "kv": None if kv == "-" else kv,
           "prompt_tokens_turn1": u1.get("prompt_tokens", log1[0]), "ttft_turn1_s": round(r1["ttft"], 3),
           "prompt_tokens_turn2": u2.get("prompt_tokens", log2[0]), "ttft_turn2_s": round(r2["ttft"], 3),
           "turn2_cache_hit": None if cached is None else cached > 0, "turn2_cached_tokens": cached, "cached_tokens_from": cached_from,
           "ratio": round(r2["ttft"] / r1["ttft"], 4),
           "decode_tps_turn1": decode_tps(r1["times"]), "decode_tps_turn2": decode_tps(r2["times"]),
           "chunks_turn1": len(r1["times"]), "completion_tokens_turn1": u1.get("completion_tokens"),
           "chunks_turn2": len(r2["times"]), "completion_tokens_turn2": u2.get("completion_tokens"),
           "reply_turn1": r1["text"]}
    if llama_log.path:
        row["llamacpp_eval_runs_turn1"], row["llamacpp_eval_runs_turn2"] = log1[2], log2[2]
    if "timings" in ours:
        row["server_decode_tps_turn2"] = round(ours["timings"]["decode_tps"], 2)
    row["warmup"] = warmup
    print(json.dumps(row), flush=True)
elif mode == "kept":
    n, kv = int(args[4]), args[5]
    resident = []
    for i in range(n):
        doc = words(text_file, n_words, skip=i * n_words)
        u = post_stream(url, {"messages": [{"role": "user", "content": doc}], "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}, "kv": kv})["last"]
        resident.append(u["kv_cache"]["resident_bytes"])
    kept = int(metric(url, "kvsplit_prompt_cache_entries"))
    cache_bytes = int(metric(url, "kvsplit_prompt_cache_resident_bytes"))
    print(json.dumps({**tag, "measure": "kept", "kv": kv, "conversations_sent": n, "tokens_each": u["usage"]["prompt_tokens"] + u["usage"]["completion_tokens"],
                      "resident_bytes_each": resident[-1], "fp16_bytes_each_16bit": u["kv_cache"]["fp16_bytes"], "kept": kept, "kept_bytes": cache_bytes}))
else:
    raise SystemExit(f"unknown mode {mode}")
