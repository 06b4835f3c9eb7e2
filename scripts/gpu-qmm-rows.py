#!/usr/bin/env python3
"""How MLX's quantized matmul scales with the number of rows on this device: y = x W^T for an
8B-model MLP weight (N 14336, K 4096), 4-bit groups of 64, at B = 1..32 rows, against the dense
f16 matmul of the same shape. If the quantized time grows with B while the bytes read stay the
weight's, a batched decode step pays one weight pass per sequence. Prints one row per B and
writes JSON to the path given as the first argument (default: stdout only).

Usage: python3 scripts/gpu-qmm-rows.py [out.json]
"""
import json, sys, time
import mlx.core as mx

N, K, G, BITS = 14336, 4096, 64, 4
mx.random.seed(0)
w = mx.random.normal((N, K)).astype(mx.float16)
wq, s, b = mx.quantize(w, group_size=G, bits=BITS)
mx.eval(w, wq, s, b)
qbytes = wq.nbytes + s.nbytes + b.nbytes


def timed(f, reps=50):
    for _ in range(5):
        mx.eval(f())
    t = time.perf_counter()
    outs = [f() for _ in range(reps)]
    mx.eval(outs)
    return (time.perf_counter() - t) / reps


rows = []
for B in [1, 2, 4, 8, 16, 32]:
    x = mx.random.normal((B, K)).astype(mx.float16)
    mx.eval(x)
    tq = timed(lambda: mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=G, bits=BITS))
    td = timed(lambda: x @ w.T)
    r = {"B": B, "qmm_us": tq * 1e6, "qmm_GBps": qbytes / tq / 1e9, "dense_us": td * 1e6, "dense_GBps": w.nbytes / td / 1e9,
         "device": str(mx.default_device()), "mlx": mx.__version__}
    rows.append(r)
    print(f"B={B:3d}  quantized {tq*1e6:8.1f} us ({r['qmm_GBps']:7.1f} GB/s of weights)   dense f16 {td*1e6:8.1f} us ({r['dense_GBps']:7.1f} GB/s)")
if len(sys.argv) > 1:
    json.dump(rows, open(sys.argv[1], "w"), indent=1)
