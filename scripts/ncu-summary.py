#!/usr/bin/env python3
"""Per-class device time of the decode steps in an `ncu --csv --page raw` log of
`bench --cuda-profile-range` (scripts/gpu-step-profile.sh): kernels, microseconds per step and
share, by kernel class, then the 25 kernel names that take the most time."""
import argparse, collections, csv, io, statistics, sys

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
    times = collections.defaultdict(list)
    for r in rows:
        times[r["Kernel Name"][:110]].append(float(r[tcol].replace(",", "")))
    # Per name: launches, summed ns, and launches times the median launch.
    by_name = {n: (len(t), sum(t), len(t) * statistics.median(t)) for n, t in times.items()}
    by_cls = collections.defaultdict(lambda: [0, 0.0, 0.0])
    for name, (k, ns, med) in by_name.items():
        c = by_cls[classify(name)]
        c[0] += k
        c[1] += ns
        c[2] += med
    total = sum(v[1] for v in by_name.values())
    total_med = sum(v[2] for v in by_name.values())
    s = a.steps
    print(f"{len(rows)} kernels over {s} decode steps: {len(rows) / s:.0f} kernels and "
          f"{total / s / 1e3:.1f} us of kernel time per step ({total_med / s / 1e3:.1f} us by median launches)\n")
    print("| kernel class | kernels / step | us / step | us / step (medians) | share (medians) |\n|---|---:|---:|---:|---:|")
    for cls, (k, ns, med) in sorted(by_cls.items(), key=lambda x: -x[1][2]):
        print(f"| {cls} | {k / s:.0f} | {ns / s / 1e3:.1f} | {med / s / 1e3:.1f} | {med / total_med:.1%} |")
    print("\n| kernel (first 110 characters) | launches / step | us / step | us / step (medians) |\n|---|---:|---:|---:|")
    for name, (k, ns, med) in sorted(by_name.items(), key=lambda x: -x[1][2])[:25]:
        print(f"| `{name.replace('|', '/')}` | {k / s:.1f} | {ns / s / 1e3:.1f} | {med / s / 1e3:.1f} |")


if __name__ == "__main__":
    main()
