"""Serve benchmark against running `kvsplit-mlx serve` instances (loopback only).

    python serve_bench.py ttft URL TEXT_FILE TOKENS       turn-1 and turn-2 time to first token
    python serve_bench.py kept URL TEXT_FILE TOKENS N KV  how many N distinct conversations stay kept

Prints one JSON line per measurement.
"""
import json
import sys
import time
import urllib.request


def post_stream(url, body):
    """Streams a chat completion; returns (seconds to first content, text, final usage chunk)."""
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    t0 = time.time()
    first, text, last = None, [], None
    with urllib.request.urlopen(req, timeout=900) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                raise SystemExit(f"server error: {ev['error']}")
            for c in ev.get("choices", []):
                piece = c.get("delta", {}).get("content")
                if piece:
                    if first is None:
                        first = time.time() - t0
                    text.append(piece)
            if ev.get("usage"):
                last = ev
    return first, "".join(text), last


def metric(url, name):
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])


def words(path, n_words, skip=0):
    w = open(path, encoding="utf-8").read().split()
    return " ".join(w[skip : skip + n_words])


mode, url, text_file, tokens = sys.argv[1], sys.argv[2].rstrip("/"), sys.argv[3], int(sys.argv[4])
# About 0.83 words a token for WikiText with SmolLM2's vocabulary (measured: 2,720 words gave
# 3,286 prompt tokens with the chat template).
n_words = int(tokens * 0.83)
if mode == "ttft":
    kv = sys.argv[5] if len(sys.argv) > 5 else "k8v4"
    doc = words(text_file, n_words)
    msgs = [{"role": "user", "content": "Summarize this article in one sentence.\n\n" + doc}]
    body = {"messages": msgs, "max_tokens": 32, "stream": True, "stream_options": {"include_usage": True}, "kv": kv}
    t1, reply, u1 = post_stream(url, body)
    msgs2 = msgs + [{"role": "assistant", "content": reply}, {"role": "user", "content": "Now name one person it mentions."}]
    t2, _, u2 = post_stream(url, {**body, "messages": msgs2})
    print(json.dumps({"measure": "ttft", "kv": kv, "prompt_tokens_turn1": u1["usage"]["prompt_tokens"], "ttft_turn1_s": round(t1, 3),
                      "prompt_tokens_turn2": u2["usage"]["prompt_tokens"], "ttft_turn2_s": round(t2, 3),
                      "turn2_cache_hit": u2["kv_cache"]["prompt_cache_hit"], "turn2_cached_tokens": u2["kv_cache"]["cached_tokens"],
                      "ratio": round(t2 / t1, 4), "decode_tps_turn2": round(u2["timings"]["decode_tps"], 2)}))
elif mode == "kept":
    n, kv = int(sys.argv[5]), sys.argv[6]
    resident = []
    for i in range(n):
        doc = words(text_file, n_words, skip=i * n_words)
        _, _, u = post_stream(url, {"messages": [{"role": "user", "content": doc}], "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}, "kv": kv})
        resident.append(u["kv_cache"]["resident_bytes"])
    kept = int(metric(url, "kvsplit_prompt_cache_entries"))
    cache_bytes = int(metric(url, "kvsplit_prompt_cache_resident_bytes"))
    print(json.dumps({"measure": "kept", "kv": kv, "conversations_sent": n, "tokens_each": u["usage"]["prompt_tokens"] + u["usage"]["completion_tokens"],
                      "resident_bytes_each": resident[-1], "fp16_bytes_each_16bit": u["kv_cache"]["fp16_bytes"], "kept": kept, "kept_bytes": cache_bytes}))
else:
    raise SystemExit(f"unknown mode {mode}")
