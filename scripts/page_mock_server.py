#!/usr/bin/env python3
"""A stand-in for `kvsplit-mlx serve`, to test the chat page before the real server exists.

Stdlib only. Serves crates/cli/src/serve_page.html at `/`, `GET /v1/models`, and a streaming
`POST /v1/chat/completions` that answers a few words as Server-Sent Events and ends with the
usage chunk our server sends (usage, kv_cache, timings), then `data: [DONE]`.

The prompt cache is mimicked the way the real one behaves: after each answer the conversation
(messages plus the answer) is remembered per K/V setting, and a later request whose messages
start with a remembered conversation is a hit, with that conversation's tokens cached. So the
first turn of a conversation misses and the next one hits.

KV bytes follow the real layout for a Qwen2.5-0.5B-like model (24 layers, 2 KV heads,
head_dim 64): fp16 is 2 bytes an element; quantized is bits/8 bytes an element plus an fp16
scale and bias per group of 64.

    python3 scripts/page_mock_server.py [--port 0] [--delay 0.05]

Prints `listening on http://127.0.0.1:PORT` once bound (port 0 picks a free one). Loopback only.
"""

import argparse
import json
import re
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

PAGE = Path(__file__).resolve().parent.parent / "crates" / "cli" / "src" / "serve_page.html"
MODEL_ID = "qwen2.5-0.5b-instruct (mock)"
LAYERS, KV_HEADS, HEAD_DIM, GROUP = 24, 2, 64, 64
PRESETS = {"fp16": (16, 16), "k8v8": (8, 8), "k8v4": (8, 4), "k4v8": (4, 8), "k4v4": (4, 4), "k4v2": (4, 2)}
VALID_BITS = (2, 3, 4, 5, 6, 8, 16)
# Tokens a chat template adds around each message (role markers); a rough but fixed count.
TEMPLATE_TOKENS_PER_MESSAGE = 4


class ApiError(Exception):
    def __init__(self, status, message, param=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def parse_kv(value):
    """(k_bits, v_bits) from a preset or `K,V` / `B`; ApiError naming `kv` otherwise."""
    if value in PRESETS:
        return PRESETS[value]
    parts = str(value).split(",")
    try:
        bits = [int(p) for p in parts]
    except ValueError:
        bits = []
    if len(bits) == 1:
        bits *= 2
    if len(bits) != 2 or any(b not in VALID_BITS for b in bits):
        raise ApiError(400, f"kv: unknown setting '{value}'; use a preset ({', '.join(PRESETS)}) "
                            f"or K,V bits from {list(VALID_BITS)}", param="kv")
    return bits[0], bits[1]


def bytes_per_element(bits):
    return 2.0 if bits == 16 else bits / 8 + 4 / GROUP  # fp16 scale + bias per group


def kv_bytes(tokens, k_bits, v_bits):
    elements = LAYERS * KV_HEADS * HEAD_DIM * tokens
    return round(elements * (bytes_per_element(k_bits) + bytes_per_element(v_bits)))


def count_tokens(text):
    # Words and punctuation marks: close enough to a BPE count for a mock.
    return len(re.findall(r"\w+|[^\w\s]", text))


def prompt_tokens(messages):
    return sum(count_tokens(m.get("content", "")) + TEMPLATE_TOKENS_PER_MESSAGE for m in messages)


def answer_for(messages, setting, max_tokens):
    question = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
    topic = " ".join(question.split()[:6]) or "nothing"
    turn = sum(1 for m in messages if m.get("role") == "user")
    words = (f"This is the mock server answering turn {turn}, about \u201c{topic}\u201d. "
             f"Its KV cache runs at {setting}: keys and values are stored at different precisions, "
             f"so this conversation takes less memory than fp16 would.").split(" ")
    pieces = [w + " " for w in words[:-1]] + [words[-1]]
    return pieces[:max_tokens], ("length" if len(pieces) > max_tokens else "stop")


class PromptCache:
    """Remembered conversations per K/V setting; a request hits on the longest stored prefix."""

    def __init__(self):
        self.lock = threading.Lock()
        self.entries = []  # (setting, messages)

    def lookup(self, setting, messages):
        with self.lock:
            best = None
            for s, stored in self.entries:
                if s == setting and len(stored) <= len(messages) and messages[:len(stored)] == stored:
                    if best is None or len(stored) > len(best):
                        best = stored
            return best

    def store(self, setting, messages):
        with self.lock:
            self.entries.append((setting, messages))
            del self.entries[:-32]  # a small LRU is enough here


class Handler(BaseHTTPRequestHandler):
    server_version = "kvsplit-mlx-mock/0"
    cache = PromptCache()
    delay = 0.05

    def log_message(self, fmt, *args):
        sys.stderr.write("[mock] " + (fmt % args) + "\n")

    def send_json(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_error_obj(self, e):
        self.send_json(e.status, {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": None}})

    def do_GET(self):
        if self.path == "/":
            body = PAGE.read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [{"id": MODEL_ID, "object": "model", "owned_by": "kvsplit-mlx"}]})
        else:
            self.send_error_obj(ApiError(404, f"no route for GET {self.path}", kind="not_found_error"))

    def do_POST(self):
        if self.path != "/v1/chat/completions":
            self.send_error_obj(ApiError(404, f"no route for POST {self.path}", kind="not_found_error"))
            return
        try:
            req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
            self.chat(req)
        except ApiError as e:
            self.send_error_obj(e)
        except json.JSONDecodeError as e:
            self.send_error_obj(ApiError(400, f"request body is not JSON: {e}"))
        except (BrokenPipeError, ConnectionResetError):
            # The page's Stop button closes the stream; nothing is cached for a cut-off answer.
            self.log_message("client closed the stream early")

    def chat(self, req):
        messages = req.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages: expected a non-empty list", param="messages")
        if req.get("model") not in (None, MODEL_ID):
            raise ApiError(404, f"model '{req.get('model')}' not found; this server has '{MODEL_ID}'",
                           param="model", kind="not_found_error")
        if not req.get("stream"):
            raise ApiError(400, "the mock server only streams; send \"stream\": true", param="stream")
        max_tokens = req.get("max_tokens", 256)
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ApiError(400, f"max_tokens: expected a whole number >= 1, got {max_tokens!r}", param="max_tokens")
        kv = req.get("kv", "fp16")
        k_bits, v_bits = parse_kv(kv)
        setting = kv if kv in PRESETS else f"k{k_bits}v{v_bits}"

        hit = self.cache.lookup(setting, messages)
        cached = prompt_tokens(hit) if hit else 0
        n_prompt = prompt_tokens(messages)
        prompt_ms = 0.4 * (n_prompt - cached) + 3.0

        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()

        def event(obj):
            self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
            self.wfile.flush()

        def chunk(delta, finish=None):
            event({"id": cid, "object": "chat.completion.chunk", "created": created, "model": MODEL_ID,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

        time.sleep(prompt_ms / 1000)
        chunk({"role": "assistant"})
        pieces, finish = answer_for(messages, setting, max_tokens)
        start = time.perf_counter()
        for p in pieces:
            time.sleep(self.delay)
            chunk({"content": p})
        decode_s = max(time.perf_counter() - start, 1e-6)
        chunk({}, finish)
        answer = "".join(pieces)
        n_completion = len(pieces)
        total = n_prompt + n_completion
        event({"id": cid, "object": "chat.completion.chunk", "created": created, "model": MODEL_ID, "choices": [],
               "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": total},
               "kv_cache": {"setting": setting, "resident_bytes": kv_bytes(total, k_bits, v_bits),
                            "fp16_bytes": kv_bytes(total, 16, 16), "prompt_cache_hit": hit is not None,
                            "cached_tokens": cached},
               "timings": {"prompt_ms": round(prompt_ms, 1), "decode_tps": round(n_completion / decode_s, 1)}})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
        self.cache.store(setting, messages + [{"role": "assistant", "content": answer}])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default 0: a free one)")
    ap.add_argument("--delay", type=float, default=0.05, help="seconds between streamed words (default 0.05)")
    args = ap.parse_args()
    Handler.delay = args.delay
    httpd = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    httpd.daemon_threads = True
    print(f"listening on http://127.0.0.1:{httpd.server_address[1]}", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
