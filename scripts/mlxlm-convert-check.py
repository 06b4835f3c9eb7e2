#!/usr/bin/env python3
"""Loads a directory written by `kvsplit-mlx convert` with mlx-lm (the reference MLX loader,
through transformers' tokenizer) and prints its load time, the prompt ids and the greedy
continuation, to compare with `kvsplit-mlx generate --model DIR` on the same prompt.

Setup (a development tool, not a dependency):
    python3 -m venv /tmp/mlxlm && /tmp/mlxlm/bin/pip install mlx-lm "mlx[cpu]"
Usage:
    /tmp/mlxlm/bin/python scripts/mlxlm-convert-check.py DIR "PROMPT" [MAX_TOKENS]
"""
import sys
import time

from mlx_lm import load
from mlx_lm.generate import generate
from mlx_lm.sample_utils import make_sampler

path, prompt = sys.argv[1], sys.argv[2]
max_tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 8
t = time.time()
model, tokenizer = load(path)
print("load_s", round(time.time() - t, 3))
ids = tokenizer.encode(prompt)
print("ids", ids)
text = generate(model, tokenizer, prompt=ids, max_tokens=max_tokens, sampler=make_sampler(0.0), verbose=False)
print("text", repr(text))
