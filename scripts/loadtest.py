#!/usr/bin/env python3
"""Load test of an OpenAI-compatible chat server on loopback: N streaming chat requests at
concurrency C, each with its own ~P-token prompt, asking for up to M tokens. Standard library
only. Bounded: N requests at most, and a run deadline after which nothing new is sent, requests
in flight are cut, and the report is written anyway; the tool always stops by itself.

    python3 scripts/loadtest.py URL --requests N --concurrency C --prompt-tokens P --max-tokens M
        [--pid PID] [--deadline S] [--request-timeout S] [--json-out FILE] [--tag JSON]
        [--text FILE] [--warmup K] [--prompt-cache] [--model NAME] [--extra-body JSON]

Requests (the same for every server, given the same text file, N, P and M): request i's user
message is the i-th of consecutive, non-overlapping WikiText-2 excerpts (wiki.test.raw), so no
two prompts share more than the chat template's prefix, followed by an instruction to write a
long essay, so that models use their whole max_tokens. P counts the whole prompt with SmolLM2's
chat template: each excerpt is cut at ~P-68 tokens by a per-word estimate (est_tokens), so the
real prompts come out within about -18%/+9% of that (the row's prompt_tokens_mean, from usage,
says what they were; other models' tokenizers and templates differ). Every request is `stream: true`, `stream_options.include_usage`,
`temperature: 0`, `max_tokens: M`, and, unless --prompt-cache, `cache_prompt: false`
(llama-server's switch for reusing a slot's prompt; servers that do not know it ignore it).
There is no ignore_eos (our server has none), so answer lengths are what the models write:
the report gives the actual completion tokens and finish reasons.

Measured by this client, the same way for every server, per request:
  TTFT   from sending the request to the first streamed chunk with non-empty content
  ITL    every gap between consecutive content chunks (pooled over all requests)
  tokens usage.completion_tokens where the server sends it, else the number of content chunks
         (both are reported; the servers measured here stream one chunk per token with text)
Aggregate tok/s = generated tokens of the successful requests / wall time of the whole run
(from the first request sent to the last one finished; warm-up requests are not in it).
Errors are counted by kind: http_<status>, connection (refused, reset, closed early), timeout
(--request-timeout without a byte), deadline (cut by the run deadline), stream_error (an error
object in the stream), bad_stream (unparseable), no_content (200 but no text).
--pid samples VmRSS of that process from /proc every 0.1 s: peak_rss_mb is the peak during the
run (warm-up included), peak_rss_anon_mb the peak of its anonymous part (RssAnon: without
file pages such as an mmapped GGUF, which llama-server keeps mapped and counts in its RSS),
rss_before_mb before the run, vm_hwm_mb the kernel's high-water mark since the process started
(model loading included). CPU seconds during the run, from /proc: host_cpu_s
(all busy CPU), server_cpu_s (the --pid process), client_cpu_s (this tool) and other_cpu_s (the
rest: other load on the machine, which the numbers then include), with the load averages.

Prints one JSON line on stdout (fields of --tag first), appends it to --json-out, and a short
summary on stderr. Exit status 0 when every request succeeded, 1 otherwise.
"""
import argparse
import hashlib
import http.client
import ipaddress
import json
import math
import os
import socket
import sys
import threading
import time
import urllib.parse

# Prompt tokens besides the excerpt, with SmolLM2's chat template (its default system prompt
# included: 30 tokens for an empty user message) and INSTRUCTION (38): measured with our server.
OVERHEAD = 68
INSTRUCTION = ("\n\nWrite a long, detailed essay of at least 2,000 words about the text above: "
               "its subject, its people and places, and their history. Do not stop early.")


def default_text():
    cache = os.environ.get("KVSPLIT_CACHE") or os.path.expanduser("~/.cache/kvsplit-mlx")
    return os.path.join(cache, "data", "wikitext-2-raw", "wiki.test.raw")


def percentile(xs, q):
    """Linear interpolation between closest ranks (numpy's default); None for no data."""
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def ms(x):
    return None if x is None else round(x * 1000.0, 2)


def est_tokens(word):
    """Rough token count of one whitespace-separated word with SmolLM2's vocabulary: fitted on
    48 WikiText-2 excerpts against the server's usage.prompt_tokens (a word ~1 token, each digit
    and punctuation mark ~one more); sums over 150-word excerpts came within -18%/+9% of the real
    count (words alone: -20%/+13%)."""
    return (1.2 + sum(1 for ch in word if not ch.isalpha())) / 1.21


def make_prompts(text_file, n, prompt_tokens):
    """n distinct prompts of ~prompt_tokens tokens each, chat template and instruction included:
    consecutive, non-overlapping WikiText-2 excerpts of ~(prompt_tokens - OVERHEAD) tokens."""
    words = open(text_file, encoding="utf-8").read().split()
    target = max(8, prompt_tokens - OVERHEAD)
    prompts, pos, n_words = [], 0, []
    for _ in range(n):
        got, t = [], 0.0
        while t < target:
            if pos >= len(words):
                pos = 0  # wraps only past ~300K tokens of requests
            w = words[pos]
            pos += 1
            got.append(w)
            t += est_tokens(w)
        prompts.append(" ".join(got) + INSTRUCTION)
        n_words.append(len(got))
    return prompts, round(sum(n_words) / len(n_words), 1)


def check_loopback(url):
    u = urllib.parse.urlsplit(url)
    if u.scheme != "http" or not u.hostname or not u.port:
        raise SystemExit(f"loadtest: URL must be http://HOST:PORT, got {url!r}")
    host = u.hostname
    if host != "localhost":
        try:
            if not ipaddress.ip_address(host).is_loopback:
                raise ValueError
        except ValueError:
            raise SystemExit(f"loadtest: loopback only (127.0.0.1, ::1, localhost), got {host!r}")
    return host, u.port, (u.path.rstrip("/") or "")


def cpu_seconds(pid):
    """(busy CPU seconds of the whole host, of process pid or None, of this client) so far."""
    hz = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    host = (sum(v[:8]) - v[3] - v[4]) / hz  # user..steal less idle and iowait
    proc = None
    if pid:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            proc = (int(fields[11]) + int(fields[12])) / hz  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    t = os.times()
    return host, proc, t.user + t.system


def served_model(host, port, path):
    """The first model id the server lists (our server refuses other names), or None."""
    try:
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request("GET", path + "/v1/models")
        resp = conn.getresponse()
        data = json.loads(resp.read()) if resp.status == 200 else {}
        conn.close()
        return (data.get("data") or [{}])[0].get("id")
    except (OSError, ValueError, http.client.HTTPException, AttributeError):
        return None


class RssSampler(threading.Thread):
    def __init__(self, pid, every=0.1):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.peak_kb, self.peak_anon_kb, self.samples, self.hwm_kb = 0, 0, 0, None
        self.stop_ev = threading.Event()

    def read(self):
        try:
            with open(f"/proc/{self.pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            return None, None, None
        kb = lambda k: int(fields[k].split()[0]) if k in fields else None  # noqa: E731
        return kb("VmRSS"), kb("VmHWM"), kb("RssAnon")

    def run(self):
        while not self.stop_ev.is_set():
            rss, hwm, anon = self.read()
            if rss is not None:
                self.peak_kb, self.samples = max(self.peak_kb, rss), self.samples + 1
                self.peak_anon_kb, self.hwm_kb = max(self.peak_anon_kb, anon or 0), hwm
            self.stop_ev.wait(self.every)

    def stop(self):
        self.stop_ev.set()
        self.join(timeout=2)
        rss, hwm, anon = self.read()  # one last look
        if rss is not None:
            self.peak_kb, self.peak_anon_kb, self.hwm_kb = max(self.peak_kb, rss), max(self.peak_anon_kb, anon or 0), hwm


class Result:
    __slots__ = ("index", "ok", "error", "detail", "t_start", "t_end", "ttft", "times", "chunks",
                 "usage", "finish_reason", "chars")

    def __init__(self, index):
        self.index, self.ok, self.error, self.detail = index, False, None, None
        self.t_start = self.t_end = self.ttft = None
        self.times, self.chunks, self.usage, self.finish_reason, self.chars = [], 0, None, None, 0


def one_request(host, port, path, body, req_timeout, hard_end, index):
    """Sends one streaming chat request; returns its Result (never raises)."""
    r = Result(index)
    data = json.dumps(body).encode()
    conn = http.client.HTTPConnection(host, port, timeout=max(0.05, min(req_timeout, hard_end - time.monotonic())))
    r.t_start = time.monotonic()
    req_end = r.t_start + req_timeout

    def arm():  # each blocking read may wait up to the request's or the run's end, whichever first
        left = min(req_end, hard_end) - time.monotonic()
        if left <= 0:
            raise socket.timeout("out of time")
        if conn.sock is not None:
            conn.sock.settimeout(left)

    try:
        conn.request("POST", path + "/v1/chat/completions", body=data,
                     headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
        arm()
        resp = conn.getresponse()
        if resp.status != 200:
            r.error = f"http_{resp.status}"
            try:
                r.detail = resp.read(2000).decode("utf-8", "replace")[:300]
            except Exception:  # noqa: BLE001
                pass
            return r
        while True:
            arm()
            raw = resp.readline()
            if not raw:
                break
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                break
            try:
                ev = json.loads(payload)
            except ValueError:
                r.error, r.detail = "bad_stream", payload[:300]
                return r
            if "error" in ev:
                r.error, r.detail = "stream_error", json.dumps(ev["error"])[:300]
                return r
            for c in ev.get("choices") or []:
                piece = (c.get("delta") or {}).get("content")
                if piece:
                    t = time.monotonic()
                    if r.ttft is None:
                        r.ttft = t - r.t_start
                    r.times.append(t)
                    r.chunks += 1
                    r.chars += len(piece)
                if c.get("finish_reason"):
                    r.finish_reason = c["finish_reason"]
            if ev.get("usage"):
                r.usage = ev["usage"]
        if r.chunks == 0:
            r.error = "no_content"
        else:
            r.ok = True
    except (socket.timeout, TimeoutError) as e:
        r.error = "deadline" if time.monotonic() >= hard_end - 0.01 else "timeout"
        r.detail = str(e)[:300]
    except (ConnectionError, http.client.HTTPException, OSError) as e:
        r.error, r.detail = "connection", f"{type(e).__name__}: {e}"[:300]
    except Exception as e:  # noqa: BLE001 - a load test reports, it does not crash
        r.error, r.detail = "client_exception", f"{type(e).__name__}: {e}"[:300]
    finally:
        r.t_end = time.monotonic()
        conn.close()
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("url")
    ap.add_argument("--requests", "-n", type=int, default=32)
    ap.add_argument("--concurrency", "-c", type=int, default=4)
    ap.add_argument("--prompt-tokens", "-p", type=int, default=256)
    ap.add_argument("--max-tokens", "-m", type=int, default=64)
    ap.add_argument("--pid", type=int, help="server process whose VmRSS is sampled every 0.1 s")
    ap.add_argument("--deadline", type=float, default=600.0, help="seconds for the whole run (default 600)")
    ap.add_argument("--request-timeout", type=float, default=300.0, help="seconds for one request (default 300)")
    ap.add_argument("--json-out", help="append the JSON row to this file")
    ap.add_argument("--tag", default="{}", help="JSON object whose fields go first in the row")
    ap.add_argument("--text", default=None, help="text the prompts are cut from (default: WikiText-2 test in $KVSPLIT_CACHE)")
    ap.add_argument("--warmup", type=int, default=1, help="short requests sent first, not measured (default 1)")
    ap.add_argument("--prompt-cache", action="store_true", help="do not send cache_prompt: false")
    ap.add_argument("--model", default=None, help="the request's model field (default: the first id of GET /v1/models, else none)")
    ap.add_argument("--extra-body", default="{}", help="JSON object merged into every request body")
    a = ap.parse_args()
    if min(a.requests, a.concurrency, a.prompt_tokens, a.max_tokens) < 1 or a.deadline <= 0 or a.warmup < 0:
        raise SystemExit("loadtest: --requests, --concurrency, --prompt-tokens, --max-tokens must be >= 1, --deadline > 0")
    host, port, path = check_loopback(a.url)
    tag = json.loads(a.tag)
    extra = json.loads(a.extra_body)
    text = a.text or default_text()
    if not os.path.isfile(text):
        raise SystemExit(f"loadtest: no text at {text} (scripts/serve-bench.sh or `kvsplit-mlx ppl wikitext` fetches WikiText-2)")
    prompts, n_words = make_prompts(text, a.requests, a.prompt_tokens)

    model = a.model or served_model(host, port, path)

    def body(content, max_tokens):
        b = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
             "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        if model:
            b["model"] = model
        if not a.prompt_cache:
            b["cache_prompt"] = False
        b.update(extra)
        return b

    bodies = [body(p, a.max_tokens) for p in prompts]
    requests_sha = hashlib.sha256(json.dumps([b["messages"] for b in bodies]).encode()).hexdigest()[:16]

    load_start = open("/proc/loadavg").read().split()[:3]
    t_begin = time.monotonic()
    hard_end = t_begin + a.deadline
    sampler = None
    if a.pid:
        sampler = RssSampler(a.pid)
        rss0 = sampler.read()[0]
        if rss0 is None:
            raise SystemExit(f"loadtest: cannot read /proc/{a.pid}/status")
        sampler.start()

    warm = [one_request(host, port, path, body(f"Say hello number {i}.", 8), a.request_timeout, hard_end, -1 - i) for i in range(a.warmup)]

    results = [None] * a.requests
    lock = threading.Lock()
    nxt = [0]

    def worker():
        while True:
            with lock:
                i = nxt[0]
                if i >= a.requests or time.monotonic() >= hard_end:
                    return
                nxt[0] += 1
            results[i] = one_request(host, port, path, bodies[i], a.request_timeout, hard_end, i)

    cpu0 = cpu_seconds(a.pid)
    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(a.concurrency, a.requests))]
    for t in threads:
        t.start()
    for t in threads:  # every read is bounded by hard_end; a few seconds more for the teardown
        t.join(timeout=max(0.0, hard_end + 5.0 - time.monotonic()))
    if sampler:
        sampler.stop()

    load_end = open("/proc/loadavg").read().split()[:3]
    cpu1 = cpu_seconds(a.pid)
    done = [r for r in results if r is not None]
    hung = sum(1 for t in threads if t.is_alive())
    not_sent = a.requests - len(done)
    ok = [r for r in done if r.ok]
    errors = {}
    for r in done:
        if not r.ok:
            errors[r.error] = errors.get(r.error, 0) + 1
    if hung:  # a thread stuck past the deadline's grace (should not happen): its request is lost
        errors["deadline"] = errors.get("deadline", 0) + hung
        not_sent -= hung
    t_last = max((r.t_end for r in done), default=t0)
    wall = max(t_last - t0, 1e-9)
    usage_tokens = [r.usage.get("completion_tokens") for r in ok if r.usage and r.usage.get("completion_tokens") is not None]
    all_usage = len(usage_tokens) == len(ok) and ok
    tokens_each = [r.usage["completion_tokens"] if all_usage else r.chunks for r in ok]
    gen_tokens = sum(tokens_each)
    chunks = sum(r.chunks for r in ok)
    ttfts = [r.ttft for r in ok]
    itls = [b - a_ for r in ok for a_, b in zip(r.times, r.times[1:])]
    e2e = [r.t_end - r.t_start for r in ok]
    prompt_toks = [r.usage.get("prompt_tokens") for r in ok if r.usage and r.usage.get("prompt_tokens") is not None]
    finish = {}
    for r in ok:
        finish[str(r.finish_reason)] = finish.get(str(r.finish_reason), 0) + 1
    per_req_tps = [(r.chunks - 1) / (r.times[-1] - r.times[0]) for r in ok if r.chunks > 1 and r.times[-1] > r.times[0]]
    first_error = next((f"{r.error}: {r.detail}" for r in done if not r.ok and r.detail), None)

    row = {**tag, "measure": "loadtest", "url_port": port, "model_field": model, "requests": a.requests, "concurrency": a.concurrency,
           "prompt_tokens_asked": a.prompt_tokens, "prompt_words_mean": n_words, "max_tokens": a.max_tokens,
           "cache_prompt_false_sent": not a.prompt_cache, "requests_sha": requests_sha, "deadline_s": a.deadline,
           "warmup_requests": a.warmup, "warmup_ok": sum(1 for r in warm if r.ok),
           "ok": len(ok), "errors": errors, "errors_total": sum(errors.values()), "not_sent": not_sent,
           "wall_s": round(wall, 3),
           "generated_tokens": gen_tokens, "tokens_from": "usage.completion_tokens" if all_usage else "content chunks",
           "content_chunks": chunks, "usage_completion_tokens": sum(usage_tokens) if usage_tokens else None,
           "agg_tok_s": round(gen_tokens / wall, 2),
           "completion_tokens_min": min(tokens_each, default=None), "completion_tokens_mean": round(gen_tokens / len(ok), 1) if ok else None,
           "completion_tokens_max": max(tokens_each, default=None), "finish_reasons": finish,
           "prompt_tokens_mean": round(sum(prompt_toks) / len(prompt_toks), 1) if prompt_toks else None,
           "ttft_p50_ms": ms(percentile(ttfts, 50)), "ttft_p99_ms": ms(percentile(ttfts, 99)),
           "ttft_max_ms": ms(max(ttfts, default=None)),
           "itl_p50_ms": ms(percentile(itls, 50)), "itl_p99_ms": ms(percentile(itls, 99)),
           "itl_mean_ms": ms(sum(itls) / len(itls)) if itls else None, "itl_count": len(itls),
           "e2e_p50_s": None if not e2e else round(percentile(e2e, 50), 3), "e2e_p99_s": None if not e2e else round(percentile(e2e, 99), 3),
           "loadavg_start": " ".join(load_start), "loadavg_end": " ".join(load_end),
           "per_request_decode_tok_s_mean": round(sum(per_req_tps) / len(per_req_tps), 2) if per_req_tps else None}
    host_cpu, client_cpu = cpu1[0] - cpu0[0], cpu1[2] - cpu0[2]
    row.update({"host_cpu_s": round(host_cpu, 1), "client_cpu_s": round(client_cpu, 1), "cpus": os.cpu_count()})
    if cpu0[1] is not None and cpu1[1] is not None:
        server_cpu = cpu1[1] - cpu0[1]
        # CPU that neither the server nor this client used during the run: other load on the
        # machine, which makes the numbers worth less (llama.cpp with -t nproc suffers most)
        row.update({"server_cpu_s": round(server_cpu, 1), "other_cpu_s": round(max(0.0, host_cpu - server_cpu - client_cpu), 1)})
    if sampler:
        row.update({"pid": a.pid, "rss_before_mb": round(rss0 / 1024, 1), "peak_rss_mb": round(sampler.peak_kb / 1024, 1),
                    "peak_rss_anon_mb": round(sampler.peak_anon_kb / 1024, 1),
                    "vm_hwm_mb": None if sampler.hwm_kb is None else round(sampler.hwm_kb / 1024, 1), "rss_samples": sampler.samples})
    if first_error:
        row["first_error"] = first_error
    line = json.dumps(row)
    print(line, flush=True)
    if a.json_out:
        with open(a.json_out, "a") as f:
            f.write(line + "\n")
    f1 = lambda x, d=1: "-" if x is None else f"{x:.{d}f}"  # noqa: E731
    print(f"[loadtest] {len(ok)}/{a.requests} ok in {wall:.1f} s, {gen_tokens} tokens ({row['tokens_from']}): "
          f"{row['agg_tok_s']:.1f} tok/s aggregate | TTFT p50 {f1(row['ttft_p50_ms'], 0)} ms p99 {f1(row['ttft_p99_ms'], 0)} ms | "
          f"ITL p50 {f1(row['itl_p50_ms'])} ms p99 {f1(row['itl_p99_ms'])} ms | "
          f"errors {errors or 'none'}{f', {not_sent} not sent' if not_sent else ''}"
          + (f" | peak RSS {row['peak_rss_mb']:.0f} MB" if sampler else "")
          + (f" | CPU s: server {row['server_cpu_s']}, other {row['other_cpu_s']}" if "other_cpu_s" in row else ""), file=sys.stderr)
    if first_error:
        print(f"[loadtest] first error: {first_error}", file=sys.stderr)
    sys.exit(0 if len(ok) == a.requests else 1)


if __name__ == "__main__":
    main()
