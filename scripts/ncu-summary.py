#!/usr/bin/env python3
"""Per-class device time of the decode steps in an `ncu --csv --page raw` log of
`bench --cuda-profile-range` (scripts/gpu-step-profile.sh): kernels, microseconds per step and
share, by kernel class, then the 25 kernel names that take the most time."""
import argparse, collections, csv, io, sys

CLASSES = [  # first match wins; MLX's CUDA kernel names, ours are custom_kernel_* names
    # Weights first: our matvec is a kvsplit_ custom kernel too.
    ("4-bit weight matmul", ("qmv", "qmm", "quantized", "affine", "gemv_q", "fp_q")),
    ("our attention / cache step", ("kvsplit", "custom_kernel", "decode_partial", "decode_fold", "kv_")),
    ("dense matmul / gemv", ("gemm", "gemv", "cutlass", "sm90", "matmul", "cublas")),
    ("rms norm", ("rms",)),
    ("rope", ("rope",)),
    ("softmax / sdpa", ("softmax", "sdpa", "attention")),
    ("reduce / arg-reduce (sampling)", ("reduce", "arg_")),
    ("copy / gather / scatter", ("copy", "gather", "scatter", "slice", "concat")),
    ("elementwise", ("binary", "unary", "ternary", "compiled", "fused")),
]


def classify(name):
    low = name.lower()
    for cls, keys in CLASSES:
        if any(k in low for k in keys):
            return cls
    return "other"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--steps", type=int, required=True)
    a = ap.parse_args()
    text = open(a.csv, errors="replace").read()
    # ncu prints its own lines (==PROF==) before the table; the table starts at its header.
    start = text.find('"ID"')
    if start < 0:
        sys.exit(f"{a.csv}: no ncu table (did ncu profile any kernel?)")
    rows = list(csv.DictReader(io.StringIO(text[start:])))
    rows = [r for r in rows if r.get("ID", "").isdigit()]
    if not rows:
        sys.exit(f"{a.csv}: the table has no kernel rows")
    tcol = "gpu__time_duration.sum"
    by_cls = collections.defaultdict(lambda: [0, 0.0])
    by_name = collections.defaultdict(lambda: [0, 0.0])
    total = 0.0
    for r in rows:
        ns = float(r[tcol].replace(",", ""))
        name = r["Kernel Name"]
        c = by_cls[classify(name)]
        c[0] += 1
        c[1] += ns
        n = by_name[name[:110]]
        n[0] += 1
        n[1] += ns
        total += ns
    s = a.steps
    print(f"{len(rows)} kernels over {s} decode steps: {len(rows) / s:.0f} kernels and "
          f"{total / s / 1e3:.1f} us of kernel time per step\n")
    print("| kernel class | kernels / step | us / step | share |\n|---|---:|---:|---:|")
    for cls, (k, ns) in sorted(by_cls.items(), key=lambda x: -x[1][1]):
        print(f"| {cls} | {k / s:.0f} | {ns / s / 1e3:.1f} | {ns / total:.1%} |")
    print("\n| kernel (first 110 characters) | launches / step | us / step |\n|---|---:|---:|")
    for name, (k, ns) in sorted(by_name.items(), key=lambda x: -x[1][1])[:25]:
        print(f"| `{name.replace('|', '/')}` | {k / s:.1f} | {ns / s / 1e3:.1f} |")


if __name__ == "__main__":
    main()
