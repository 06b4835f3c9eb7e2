"""Drives a running `kvsplit-mlx serve` with the official `openai` client (and raw HTTP for what
the client cannot send). Loopback only; every call has a timeout. Exits non-zero on the first
failed check, naming it.

    python serve_openai_test.py http://127.0.0.1:PORT
"""
import json
import sys
import threading
import time
import urllib.error
import urllib.request

import openai

BASE = sys.argv[1].rstrip("/")
client = openai.OpenAI(base_url=BASE + "/v1", api_key="unused", timeout=120, max_retries=0)
MODEL = client.models.list().data[0].id
checks = 0


def check(cond, what):
    global checks
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    checks += 1
    print(f"ok: {what}")


def raw(path, body, method="POST"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(BASE + path, data=data if method == "POST" else None, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()


def metric(name):
    _, _, text = raw("/metrics", b"", method="GET")
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


# Non-streaming chat: text, usage and the kv_cache extension.
msgs = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, extra_body={"kv": "k8v4"})
text = r.choices[0].message.content
check(isinstance(text, str) and len(text) > 0, f"chat completion has text ({text!r})")
check("paris" in text.lower(), "greedy SmolLM2 names Paris")
u = r.usage
check(u.prompt_tokens > 0 and 0 < u.completion_tokens <= 16 and u.total_tokens == u.prompt_tokens + u.completion_tokens, f"usage adds up ({u})")
kv = r.model_extra["kv_cache"]
check(kv["setting"] == "k8v4+recipe" and 0 < kv["resident_bytes"] and kv["prompt_cache_hit"] is False, f"kv_cache reported ({kv})")
check(kv["source"] == "recipe:SmolLM2-135M-Instruct.Q4_1-k8v4", f"the preset ran SmolLM2's shipped recipe ({kv['source']})")
check(r.choices[0].finish_reason in ("stop", "length"), "finish_reason is stop or length")

# Turn 2 extends turn 1: the kept conversation serves the shared prefix.
msgs2 = msgs + [{"role": "assistant", "content": text}, {"role": "user", "content": "And of Italy?"}]
r2 = client.chat.completions.create(model=MODEL, messages=msgs2, max_tokens=16, extra_body={"kv": "k8v4"})
kv2 = r2.model_extra["kv_cache"]
check(kv2["prompt_cache_hit"] is True and kv2["cached_tokens"] >= u.prompt_tokens - 1, f"turn 2 reuses the kept cache ({kv2['cached_tokens']} tokens)")
check(len(r2.choices[0].message.content) > 0, "turn 2 answers")
# A request whose history ends inside the kept conversation (turn 2 regenerated) reuses it,
# trimmed. The recipe's keys are grouped per channel (64 or 128 tokens), whose codes are cut
# only between whole groups, after the one sink token each such layer keeps in float: the
# reuse is the last edge 1 + 64k before the history's end, or nothing.
r1b = client.chat.completions.create(model=MODEL, messages=msgs2, max_tokens=16, extra_body={"kv": "k8v4"})
kv1b = r1b.model_extra["kv_cache"]
p2 = r2.usage.prompt_tokens
edge = kv1b["cached_tokens"] == 0 or (kv1b["cached_tokens"] - 1) % 64 == 0
check(edge and kv1b["cached_tokens"] <= p2 - 1 and kv1b["prompt_cache_hit"] == (kv1b["cached_tokens"] > 0),
      f"a per-channel recipe cuts a kept conversation at a key-group edge ({kv1b['cached_tokens']} of {p2})")
check(len(r1b.choices[0].message.content) > 0, "and answers")
# The uniform k8v4 (as other engines run it) is another setting than the recipe, so another cache.
PLAIN = {"kv": {"bits": "k8v4", "plain": True}}
rp = client.chat.completions.create(model=MODEL, messages=msgs2, max_tokens=4, extra_body=PLAIN)
kvp = rp.model_extra["kv_cache"]
check((kvp["setting"], kvp["source"], kvp["prompt_cache_hit"]) == ("k8v4", "plain", False), f"plain k8v4 is its own setting ({kvp})")
# Per-token keys cut anywhere: regenerating the plain conversation reuses all but the last token.
rpb = client.chat.completions.create(model=MODEL, messages=msgs2, max_tokens=4, extra_body=PLAIN)
kvpb = rpb.model_extra["kv_cache"]
check(kvpb["prompt_cache_hit"] is True and kvpb["cached_tokens"] == p2 - 1, f"a history ending inside a kept conversation reuses it ({kvpb['cached_tokens']} of {p2})")
# A new conversation that shares only the chat template's opening gets a copy of that prefix
# and does not cut the kept one.
copies = metric("kvsplit_prompt_cache_copies_total")
rc = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=4, extra_body=PLAIN)
kvc = rc.model_extra["kv_cache"]
check(kvc["prompt_cache_hit"] is True and 0 < kvc["cached_tokens"] < rc.usage.prompt_tokens, f"a new conversation reuses the shared opening ({kvc['cached_tokens']} of {rc.usage.prompt_tokens} tokens)")
check(metric("kvsplit_prompt_cache_copies_total") == copies + 1, "by copying it out of the kept conversation")
r1c = client.chat.completions.create(model=MODEL, messages=msgs2, max_tokens=4, extra_body=PLAIN)
check(r1c.model_extra["kv_cache"]["cached_tokens"] == p2 - 1, "a new conversation with the same system prompt leaves the kept one whole")
# The same conversation under another setting never reuses a k8v4 cache.
r3 = client.chat.completions.create(model=MODEL, messages=msgs2, max_tokens=4, extra_body={"kv": "fp16"})
check(r3.model_extra["kv_cache"]["prompt_cache_hit"] is False, "another K/V setting misses the prompt cache")
ratio = kv2["resident_bytes"] / max(1, r3.model_extra["kv_cache"]["resident_bytes"])
check(r3.model_extra["kv_cache"]["resident_bytes"] > kv2["resident_bytes"], f"k8v4 holds fewer bytes than the dense cache (ratio {ratio:.3f})")

# Streaming chat with usage.
pieces, usage_chunk, finish = [], None, None
stream = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, stream=True, stream_options={"include_usage": True}, extra_body={"kv": "k8v4"})
for chunk in stream:
    if chunk.choices:
        d = chunk.choices[0].delta
        if d.content:
            pieces.append(d.content)
        if chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    if chunk.usage:
        usage_chunk = chunk
check(len(pieces) > 1, f"streamed in {len(pieces)} pieces")
check("".join(pieces).strip() == text.strip()[: len("".join(pieces).strip())] or "paris" in "".join(pieces).lower(), "stream says what the non-streaming call said")
check(finish in ("stop", "length"), f"stream ends with a finish_reason ({finish})")
check(usage_chunk is not None and usage_chunk.usage.completion_tokens > 0 and "kv_cache" in usage_chunk.model_extra, "include_usage adds a usage chunk with kv_cache")

# Completions, plain and streaming, and stop sequences.
c = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12)
check(len(c.choices[0].text) > 0 and c.usage.completion_tokens > 0, f"completion ({c.choices[0].text!r})")
c2 = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, stop=["7"])
check("7" not in c2.choices[0].text and c2.choices[0].finish_reason == "stop", f"stop sequence cuts the text ({c2.choices[0].text!r})")
streamed = "".join(ch.choices[0].text for ch in client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, stop=["7"], stream=True) if ch.choices)
check(streamed == c2.choices[0].text, f"streamed completion with stop equals the plain one ({streamed!r})")

# logprobs: the chosen tokens spell the text; greedy picks the most likely alternative; an end
# of turn token is not part of the text and has no entry.
lr = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, logprobs=True, top_logprobs=3, extra_body={"kv": "k8v4"})
content = lr.choices[0].logprobs.content
ended = lr.choices[0].finish_reason == "stop"
check(len(content) == lr.usage.completion_tokens - (1 if ended else 0), f"one logprobs entry per token ({len(content)} for {lr.usage.completion_tokens})")
check("".join(t.token for t in content) == lr.choices[0].message.content, "the logprobs tokens spell the answer")
check(all(t.logprob <= 0 and len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token and abs(t.top_logprobs[0].logprob - t.logprob) < 1e-6 for t in content), "greedy tokens are the top alternative, log-probabilities <= 0")
check(all(t.top_logprobs[i].logprob >= t.top_logprobs[i + 1].logprob for t in content for i in range(2)), "alternatives come most likely first")
st = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, logprobs=True, stream=True, extra_body={"kv": "k8v4"})
streamed_lp = [t for ch in st if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
check([t.token for t in streamed_lp] == [t.token for t in content], "streamed logprobs name the same tokens")
cl = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=6, logprobs=2)
lp = cl.choices[0].logprobs
check("".join(lp.tokens) == cl.choices[0].text and len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs), f"completion logprobs spell the text ({lp.tokens})")
check(lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))] and all(len(t) <= 2 for t in lp.top_logprobs), "text_offset and at most 2 alternatives")
expect_lp = raw("/v1/chat/completions", {"messages": msgs, "top_logprobs": 2})
check(expect_lp[0] == 400 and json.loads(expect_lp[2])["error"]["param"] == "top_logprobs", "top_logprobs without logprobs is a 400 naming it")

# Errors are OpenAI error objects with the right status and param.
def expect(exc, status, param, **kw):
    try:
        client.chat.completions.create(model=kw.pop("model", MODEL), messages=msgs, max_tokens=kw.pop("max_tokens", 4), **kw)
    except exc as e:
        check(e.status_code == status, f"{exc.__name__} {status}: {e.message[:100]}")
        if param is not None:
            check(e.body.get("param") == param, f"error names param {param} ({e.body.get('param')})")
        return
    check(False, f"expected {exc.__name__}")


expect(openai.BadRequestError, 400, "kv", extra_body={"kv": "k7v4"})
expect(openai.BadRequestError, 400, "kv.group_size", extra_body={"kv": {"bits": "8,4", "group_size": "48"}})
expect(openai.BadRequestError, 400, "n", n=2)
expect(openai.NotFoundError, 404, "model", model="no-such-model")
expect(openai.BadRequestError, 400, "max_tokens", max_tokens=10_000_000)
status, _, body = raw("/v1/chat/completions", b'{"messages": [')
check(status == 400 and "not valid JSON" in json.loads(body)["error"]["message"], "malformed JSON is a 400 error object")
status, _, body = raw("/v1/chat/completions", {"messages": msgs, "max_tokens": "ten"})
check(status == 400 and json.loads(body)["error"]["param"] == "max_tokens", "a wrong field type names the field")

# A client that goes away mid-stream: the server stops that generation and stays up.

before = metric("kvsplit_cancelled_total")
s = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Count from one to one hundred in words."}], max_tokens=400, stream=True)
for i, chunk in enumerate(s):
    if i >= 3:
        break
s.response.close()
deadline = time.time() + 30
while time.time() < deadline and metric("kvsplit_cancelled_total") == before:
    time.sleep(0.2)
check(metric("kvsplit_cancelled_total") == before + 1, "a disconnected stream is cancelled")
r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4)
check(len(r.choices[0].message.content) > 0, "the server answers after a cancellation")
status, _, body = raw("/health", b"", method="GET")
check(status == 200 and json.loads(body)["status"] == "ok", "/health")
status, _, text = raw("/metrics", b"", method="GET")
check(status == 200 and "kvsplit_prompt_cache_hits_total" in text and "kvsplit_queue_depth" in text, "/metrics has the counters")
status, _, page = raw("/", b"", method="GET")
check(status == 200 and "<html" in page.lower() and "http://" not in page.replace(BASE, ""), "/ serves the page, with no external resources")
print(f"all {checks} checks passed")
