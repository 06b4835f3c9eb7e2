#!/usr/bin/env python3
"""Compiles the fused decode-attention CUDA kernels with NVRTC here, without a GPU, so a
syntax or type error costs no device time. It wraps each kernel body the way MLX 0.32.2's
`fast::cuda_kernel` does (inputs as `const T*`, outputs as `T*`, template arguments as
`constexpr int`), targets sm_90 (the H200) and prints ptxas' register and spill report.

Needs NVRTC 13 and the CUDA headers, e.g. from the PyPI wheels nvidia-cuda-nvrtc==13.0.* and
nvidia-cuda-runtime==13.0.* unpacked into a folder given as the first argument (the folder
holding nvidia/cu13/{lib,include}).
NVRTC loads libnvrtc-builtins by name, so put the lib folder on LD_LIBRARY_PATH.
Usage: LD_LIBRARY_PATH=/tmp/nvrtc/x/nvidia/cu13/lib scripts/nvrtc-check-fused.py /tmp/nvrtc/x [--mma-only] [--paged] [--channels] [--widths 3,6]
  --mma-only  compile only the cases that have a tensor-core variant
  --paged     compile only the paged step kernels (fused.rs `decode_step_paged`) and their merge
  --channels  compile only the per-channel key kernel (fused.rs `attend_channels`)
  --widths    compile only the cases whose key or value width is in the list (e.g. 3,6)
  --qmv       compile only the weight matvec (mlx-ext `kernels/qmv.cu`)
  --frame     compile only the steps that enter the stored frame themselves (Hadamard rotations
              and key center inside the launch: fused.rs `decode_step` with a `StoredFrame`, and
              `step_channels`' one-launch variant)
"""
import ctypes, os, sys

root = sys.argv[1]
mma_only, paged_only = "--mma-only" in sys.argv[2:], "--paged" in sys.argv[2:]
channels_only = "--channels" in sys.argv[2:]
frame_only = "--frame" in sys.argv[2:]
widths = None
if "--widths" in sys.argv[2:]:
    widths = {int(b) for b in sys.argv[sys.argv.index("--widths") + 1].split(",")}
lib = ctypes.CDLL(os.path.join(root, "nvidia/cu13/lib/libnvrtc.so.13"))
inc = os.path.join(root, "nvidia/cu13/include")
kdir = os.path.join(os.path.dirname(__file__), "..", "crates/mlx-kv/src/attention/kernels")
read = lambda n: open(os.path.join(kdir, n)).read()
common, merge = read("decode_common.cuh"), read("decode_merge.cu")
# As fused.rs builds them: the fold (compiled only where KV_FOLD is 1) follows both passes.
partial = read("decode_partial.cu") + read("decode_fold.cu")
channels = read("decode_channels.cu") + read("decode_fold.cu")

PRELUDE = ("#include <cuda_fp16.h>\n#include <cuda_bf16.h>\ntypedef unsigned int uint32_t;\ntypedef int int32_t;\n"
           # MLX passes an input's shape by value (`const __grid_constant__ Shape x_shape`) when
           # the body names it; a stand-in with the same indexing.
           "struct Shape { int32_t v[8]; __device__ int32_t operator[](int i) const { return v[i]; } };\n")


def value_dims(d, bv, rep, gv):
    # Mirrors fused.rs `value_dims`.
    cap = min(64 // bv, 32 // rep)
    vd = 1
    while vd * 2 <= cap:
        vd *= 2
    least = 1
    while least * bv < 16 or (least * bv) % 8:
        least *= 2
    return min(max(vd, d // 32, least), gv, d)


def program(name, body, params, consts, step=0, fold=0, mma=0, paged=0, extra=""):
    body = f"#define KV_STEP {step}\n#define KV_FOLD {fold}\n#define KV_MMA {mma}\n#define KV_PAGED {paged}\n{extra}" + body
    c = "".join(f"  constexpr int {k} = {v};\n" for k, v in consts.items() if isinstance(v, int))
    c += "".join(f"  using {k} = {v};\n" for k, v in consts.items() if isinstance(v, str))
    return PRELUDE + common + "namespace mlx::core::cu {\n__global__ void " + name + "(" + ", ".join(params) + ") {\n" + c + body + "\n}\n}\n"


def compile_one(label, src):
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"k.cu", 0, None, None) == 0
    opts = [b"--gpu-architecture=sm_90", ("--include-path=" + inc).encode(), b"--ptxas-options=-v"]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, log)
    text = log.value.decode(errors="replace")
    info = [l.strip() for l in text.splitlines() if "registers" in l or "spill" in l]
    print(f"{label}: {'ok' if rc == 0 else 'FAILED'}  {' | '.join(info)}")
    if rc != 0:
        print(text)
    return rc == 0


ok = True
if "--qmv" in sys.argv[2:]:
    # mlx-ext's matvec, as mlx-ext `qmv` launches it: R is 1 or 8, the row count from x's shape.
    qdir = os.path.join(os.path.dirname(__file__), "..", "crates/mlx-ext/src/kernels")
    qhead, qbody = (open(os.path.join(qdir, n)).read() for n in ("qmv_common.cuh", "qmv.cu"))
    for (bits, group, k, n) in [(4, 64, 4096, 14336), (8, 32, 576, 49152), (4, 32, 1536, 576)]:
        for r in [1, 8]:
            for ot in ["__half", "__nv_bfloat16", "float"]:
                params = [f"const {ot}* x", "const __grid_constant__ Shape x_shape", "const uint32_t* w", "const __half* scales", "const __half* biases", f"{ot}* y"]
                c = "".join(f"  constexpr int {a} = {v};\n" for a, v in [("BITS", bits), ("GROUP", group), ("K", k), ("N", n), ("R", r)])
                c += f"  using OT = {ot};\n  using ST = __half;\n"
                src = PRELUDE + qhead + "namespace mlx::core::cu {\n__global__ void qmv(" + ", ".join(params) + ") {\n" + c + qbody + "\n}\n}\n"
                ok &= compile_one(f"qmv {bits}-bit g{group} K={k} N={n} R={r} x={ot}", src)
    sys.exit(0 if ok else 1)
if frame_only:
    # The shapes of fused_check --frame: SmolLM2 (D=64, 3 rows), Qwen2.5 (64, 7), Gemma-3 (256,
    # 4), Llama-3.1-8B (128, 4); f16 queries (the models' decode dtype) and f32.
    for (d, rep) in [(64, 3), (64, 7), (256, 4), (128, 4)]:
        for (bk, bv) in [(8, 4), (4, 4), (8, 6), (6, 6), (4, 2), (2, 3)]:
            for qt in ["__half", "float"]:
                if widths and bk not in widths and bv not in widths:
                    continue
                g = 64
                vd = value_dims(d, bv, rep, g)
                consts = dict(D=d, BK=bk, BV=bv, GK=g, GV=g, REP=rep, WARPS=4, VD=vd, SCALE_BITS=0x3f800000, ROT=3, OT=qt)
                step = [f"const {qt}* q", f"const {qt}* knew", f"const {qt}* vnew", "const uint32_t* kw", "const __grid_constant__ Shape kw_shape",
                        "const __half* ks", "const __half* kb", "const uint32_t* vw", "const __half* vs", "const __half* vb",
                        "const int32_t* pos"]
                mmas = [0, 1] if qt != "float" and d in (64, 128) and bk in (4, 8) and bv in (2, 4, 8) else [0]
                for mma in mmas:
                    tag = f"{'mma ' if mma else ''}q={qt} D={d} k{bk}v{bv} rep={rep} VD={vd}"
                    ok &= compile_one(f"step rot fold {tag}", program("kvsplit_step_rot_fold", partial, step + ["float* part", f"{qt}* out"], consts, 1, 1, mma, extra="#define KV_ROT 1\n"))
                    ok &= compile_one(f"step rot+center fold {tag}", program("kvsplit_step_rotc_fold", partial, step + [f"const {qt}* kc", "float* part", f"{qt}* out"], consts, 1, 1, mma, extra="#define KV_ROT 1\n#define KV_CENTER 1\n"))
    # The per-channel one-launch step (KV_CSTEP, rotations inside): the recipes' shapes.
    for (d, rep, gv) in [(64, 3, 64), (256, 4, 128), (64, 7, 64)]:
        for (bk, bv) in [(6, 6), (4, 4), (4, 3)]:
            qt, tt = "__half", "__half"
            vd = value_dims(d, bv, rep, gv)
            params = [f"const {qt}* q", f"const {qt}* knew", f"const {qt}* vnew", "const uint32_t* kw", "const __grid_constant__ Shape kw_shape",
                      "const __half* ks", "const __grid_constant__ Shape ks_shape", "const __half* kb", "const uint32_t* vw",
                      "const __grid_constant__ Shape vw_shape", "const __half* vs", "const __half* vb", f"const {tt}* tk",
                      "const __grid_constant__ Shape tk_shape", f"const {tt}* tv", f"const {qt}* sk", f"const {qt}* sv",
                      "const int32_t* pos", "float* part", f"{qt}* out"]
            # One sink token, as the shipped recipes keep on per-channel layers.
            consts = dict(D=d, BK=bk, BV=bv, GK=128, GV=gv, REP=rep, WARPS=4, VD=vd, SCALE_BITS=0x3f800000, ROT=3, NS=1, OT=qt, TT=tt, KT=qt, ST=qt)
            ok &= compile_one(f"channels step fold D={d} k{bk}v{bv} rep={rep} VD={vd}", program("kvsplit_channels_fold", channels, params, consts, 0, 1, extra="#define KV_CSTEP 1\n"))
    sys.exit(0 if ok else 1)
if channels_only:
    # Per-channel keys: the shipped recipes' widths and shapes (SmolLM2 D=64 rows 3, Gemma D=256
    # rows 4 with value groups of 128), Llama-3.1-8B's, and tails in f16, bf16 and f32.
    for (d, rep, gv) in [(64, 3, 64), (128, 4, 64), (256, 4, 128), (256, 8, 64), (32, 1, 32)]:
        for (bk, bv) in [(6, 6), (6, 8), (4, 4), (4, 3), (3, 3), (3, 2), (2, 2), (8, 4), (6, 4), (4, 6), (8, 8)]:
            for (qt, tt) in [("__half", "float"), ("__half", "__half"), ("__nv_bfloat16", "__nv_bfloat16")]:
                if widths and bk not in widths and bv not in widths:
                    continue
                vd = value_dims(d, bv, rep, gv)
                params = [f"const {qt}* q", "const uint32_t* kw", "const __grid_constant__ Shape kw_shape", "const __half* ks",
                          "const __grid_constant__ Shape ks_shape", "const __half* kb", "const uint32_t* vw",
                          "const __grid_constant__ Shape vw_shape", "const __half* vs", "const __half* vb", f"const {tt}* tk",
                          "const __grid_constant__ Shape tk_shape", f"const {tt}* tv", f"const {qt}* sk", f"const {qt}* sv",
                          "const int32_t* meta", "float* out_o", "float* out_m", "float* out_l"]
                # Sinks: none for a tail in f32, one token otherwise (both branches compile).
                consts = dict(D=d, BK=bk, BV=bv, GK=128, GV=gv, REP=rep, WARPS=4, VD=vd, SCALE_BITS=0x3f800000, NS=0 if tt == "float" else 1)
                ok &= compile_one(f"channels q={qt} tail={tt} D={d} k{bk}v{bv} rep={rep} VD={vd}", program("kvsplit_channels", channels, params, consts))
    sys.exit(0 if ok else 1)
# bf16 queries only with --paged (fused_check's paged case uses them; same code as f16 elsewhere).
for qt in ["__half", "float"] + (["__nv_bfloat16"] if paged_only else []):
    # fused_check's correctness shapes x its bit pairs, and the whole-model presets.
    # 3/6 bits (MLX's 3-byte packs): every shape, and rows that give 3-byte value loads.
    cases = [(d, bk, bv, rep) for (d, rep) in [(128, 4), (64, 3), (256, 8), (64, 1)]
             for (bk, bv) in [(8, 8), (8, 4), (4, 8), (4, 4), (4, 2), (8, 2), (2, 2),
                              (6, 6), (8, 6), (6, 4), (4, 6), (3, 3), (6, 3)]] + \
            [(128, 8, 4, 7), (32, 2, 2, 1), (128, 6, 6, 5), (128, 6, 6, 8), (32, 6, 6, 1), (32, 3, 3, 1), (128, 3, 3, 1)]
    if widths:
        cases = [c for c in cases if c[1] in widths or c[2] in widths]
    for (d, bk, bv, rep) in cases:
        g = 64 if d >= 64 else 32
        vd = value_dims(d, bv, rep, g)
        params = [f"const {qt}* q", "const uint32_t* kw", "const __half* ks", "const __half* kb", "const uint32_t* vw",
                  "const __half* vs", "const __half* vb", "const int32_t* meta", "float* out_o", "float* out_m", "float* out_l"]
        consts = dict(D=d, BK=bk, BV=bv, GK=g, GV=g, REP=rep, WARPS=4, VD=vd, SCALE_BITS=0x3f800000)
        # The tensor-core variant where fused.rs `mma_applies` picks it.
        for mma in ([0, 1] if qt != "float" and g == 64 and d in (64, 128) and bk in (4, 8) and bv in (2, 4, 8) else [0]):
            tag = f"{'mma ' if mma else ''}q={qt} D={d} k{bk}v{bv} rep={rep} VD={vd}"
            # Paged steps (BLOCK 256, the pool's), two launches and one.
            paged = [f"const {qt}* q", f"const {qt}* knew", f"const {qt}* vnew", "const uint32_t* kw", "const __grid_constant__ Shape kw_shape",
                     "const __half* ks", "const __half* kb", "const uint32_t* vw", "const __half* vs", "const __half* vb",
                     "const int32_t* table", "const __grid_constant__ Shape table_shape", "const int32_t* ctr"]
            if paged_only or not mma_only:
                pc = dict(consts, BLOCK=256)
                ok &= compile_one(f"paged partial {tag}", program("kvsplit_paged_partial", partial, paged + ["float* out_o", "float* out_m", "float* out_l"], pc, 1, 0, mma, 1))
                ok &= compile_one(f"paged fold {tag}", program("kvsplit_paged_fold", partial, paged + ["float* part", f"{qt}* out"], dict(pc, OT=qt), 1, 1, mma, 1))
            if paged_only:
                continue
            ok &= compile_one(f"partial {tag}", program("kvsplit_partial", partial, params, consts, mma=mma))
            if mma:
                step = [f"const {qt}* q", f"const {qt}* knew", f"const {qt}* vnew", "const uint32_t* kw", "const __grid_constant__ Shape kw_shape",
                        "const __half* ks", "const __half* kb", "const uint32_t* vw", "const __half* vs", "const __half* vb",
                        "const int32_t* pos", "float* part", f"{qt}* out"]
                ok &= compile_one(f"step fold {tag}", program("kvsplit_step_fold", partial, step, dict(consts, OT=qt), 1, 1, 1))
        if mma_only or paged_only:
            continue
        step = [f"const {qt}* q", f"const {qt}* knew", f"const {qt}* vnew", "const uint32_t* kw", "const __grid_constant__ Shape kw_shape",
                "const __half* ks", "const __half* kb", "const uint32_t* vw", "const __half* vs", "const __half* vb",
                "const int32_t* pos", "float* out_o", "float* out_m", "float* out_l"]
        ok &= compile_one(f"step partial q={qt} D={d} k{bk}v{bv} rep={rep} VD={vd}", program("kvsplit_step_partial", partial, step, consts, 1))
        fold = step[:-3] + ["float* part", f"{qt}* out"]
        ok &= compile_one(f"step fold q={qt} D={d} k{bk}v{bv} rep={rep} VD={vd}", program("kvsplit_step_fold", partial, fold, dict(consts, OT=qt), 1, 1))
    params = ["const float* part_o", "const float* part_m", "const __grid_constant__ Shape part_m_shape", "const float* part_l", f"{qt}* out"]
    ok &= compile_one(f"paged merge OT={qt}", program("kvsplit_paged_merge", merge, params, dict(D=128, REP=4, OT=qt), 1, paged=1))
    if paged_only:
        continue
    params = ["const float* part_o", "const float* part_m", "const float* part_l", "const int32_t* meta", f"{qt}* out"]
    ok &= compile_one(f"merge OT={qt}", program("kvsplit_merge", merge, params, dict(D=128, REP=4, OT=qt)))
    params = ["const float* part_o", "const float* part_m", "const __grid_constant__ Shape part_m_shape", "const float* part_l",
              "const int32_t* pos", f"{qt}* out"]
    ok &= compile_one(f"step merge OT={qt}", program("kvsplit_step_merge", merge, params, dict(D=128, REP=4, OT=qt), 1))
sys.exit(0 if ok else 1)
