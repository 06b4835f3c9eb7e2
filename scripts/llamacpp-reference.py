#!/usr/bin/env python3
"""Reference logits from llama.cpp for crates/models/tests/llamacpp_logits.rs.

For one GGUF model and a fixed text, llama.cpp (llama-cpp-python, fp16 KV cache) tokenizes the
text itself and evaluates the first --n-tokens tokens in one batch with logits for every
position. The fixture keeps, per position, the top-k logits (ids and values) and the mean and
standard deviation of the full logit vector, which is enough to compare top-1 agreement and
logit differences without storing 128 x vocab floats. It also keeps every token id of the whole
text, so our tokenizer can be checked against llama.cpp's on the same string.

With --dequantize, llama.cpp runs a temporary copy of the model whose tensors are all
dequantized to F32 (the very same weight values). llama.cpp's CPU matmuls quantize activations
to 8 bits for quantized weights but not for F32 ones, so this reference isolates the forward
pass from that rounding. gguf-py (for reading/writing GGUF) comes from the llama-cpp-python
sdist that scripts/fetch-test-data.sh downloads.

Run with the llama.cpp venv's python, e.g.
  ~/.cache/kvsplit-mlx-peers/llamacpp-venv/bin/python scripts/llamacpp-reference.py \\
      --model ~/.cache/kvsplit-mlx/models/SmolLM2-135M-Instruct.Q4_1.gguf \\
      --out tests/fixtures/llamacpp-smollm2-135m.json
"""

import argparse
import hashlib
import json
import os
import shlex
import sys

DEFAULT_TEXT = "/work/shared/data/wikitext-2-raw/wiki.test.raw"


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def import_gguf_py(sdist, dest):
    """gguf-py from the llama-cpp-python sdist, unpacked under `dest`."""
    import tarfile
    import types

    with tarfile.open(sdist) as tf:
        members = [m for m in tf.getmembers() if "/vendor/llama.cpp/gguf-py/gguf/" in m.name]
        if not members:
            sys.exit(f"no gguf-py in {sdist}")
        tf.extractall(dest, members=members)
    root = os.path.join(dest, os.path.dirname(members[0].name.split("/gguf-py/")[0] + "/gguf-py/x"))
    sys.path.insert(0, root)
    # gguf-py imports yaml only for model-card metadata, which is not used here.
    sys.modules.setdefault("yaml", types.ModuleType("yaml"))
    import gguf

    return gguf


def write_dequantized(gguf, src, dst):
    """Copies `src` to `dst` with every tensor dequantized to F32; metadata unchanged."""
    import numpy as np

    r = gguf.GGUFReader(src)
    arch_field = r.fields["general.architecture"]
    w = gguf.GGUFWriter(dst, bytes(arch_field.parts[arch_field.data[0]]).decode())
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        vt = f.types[0]
        if vt == gguf.GGUFValueType.ARRAY:
            sub = f.types[-1]
            if sub == gguf.GGUFValueType.STRING:
                val = [bytes(f.parts[i]).decode("utf-8", errors="surrogateescape") for i in f.data]
            else:
                val = [f.parts[i].tolist()[0] for i in f.data]
            w.add_key_value(f.name, val, vt, sub_type=sub)
        elif vt == gguf.GGUFValueType.STRING:
            w.add_key_value(f.name, bytes(f.parts[f.data[0]]).decode("utf-8"), vt)
        else:
            w.add_key_value(f.name, f.parts[f.data[0]].tolist()[0], vt)
    for t in r.tensors:
        a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w.add_tensor(t.name, a.reshape([int(x) for x in reversed(t.shape)]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="GGUF model file")
    ap.add_argument("--out", required=True, help="JSON fixture to write (under tests/fixtures/)")
    ap.add_argument("--text-file", default=DEFAULT_TEXT, help=f"source text (default: {DEFAULT_TEXT})")
    ap.add_argument("--text-offset", type=int, default=0, help="first character of the text to use (default 0)")
    ap.add_argument("--text-chars", type=int, default=1200, help="characters of text to take (default 1200)")
    ap.add_argument("--n-tokens", type=int, default=128, help="tokens to evaluate (default 128)")
    ap.add_argument("--n-ctx", type=int, default=512, help="llama.cpp context size (default 512)")
    ap.add_argument("--top-k", type=int, default=20, help="logits kept per position (default 20)")
    ap.add_argument("--dequantize", action="store_true", help="run llama.cpp on an F32-dequantized copy (see above)")
    ap.add_argument(
        "--sdist",
        default=os.path.expanduser("~/.cache/kvsplit-mlx/downloads/llama_cpp_python-0.3.36.tar.gz"),
        help="llama-cpp-python sdist holding gguf-py (for --dequantize)",
    )
    args = ap.parse_args()

    import numpy as np
    import llama_cpp
    from llama_cpp import Llama

    with open(args.text_file, encoding="utf-8") as f:
        text = f.read()[args.text_offset : args.text_offset + args.text_chars]

    run_path = args.model
    if args.dequantize:
        import atexit
        import shutil
        import tempfile

        work = tempfile.mkdtemp(prefix="llamacpp-reference-")
        atexit.register(shutil.rmtree, work, ignore_errors=True)
        gguf = import_gguf_py(args.sdist, work)
        run_path = os.path.join(work, "model-f32.gguf")
        write_dequantized(gguf, args.model, run_path)

    llm = Llama(
        model_path=run_path,
        n_ctx=args.n_ctx,
        n_batch=args.n_ctx,
        n_ubatch=args.n_ctx,
        logits_all=True,
        type_k=llama_cpp.GGML_TYPE_F16,
        type_v=llama_cpp.GGML_TYPE_F16,
        n_threads=2,
        seed=0,
        verbose=False,
    )
    # add_bos=True asks for the model's special tokens; llama.cpp adds BOS only where the
    # GGUF says the model wants it (Gemma yes, SmolLM2/Qwen2 no).
    all_ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    if len(all_ids) < args.n_tokens:
        sys.exit(f"text of {args.text_chars} characters gives only {len(all_ids)} tokens; raise --text-chars")
    ids = all_ids[: args.n_tokens]
    llm.reset()
    llm.eval(ids)
    logits = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
    del llm
    if not np.all(np.isfinite(logits)):
        sys.exit("llama.cpp returned non-finite logits")

    top_ids, top_vals = [], []
    for row in logits:
        order = np.argsort(-row, kind="stable")[: args.top_k]
        top_ids.append([int(i) for i in order])
        top_vals.append([round(float(row[i]), 5) for i in order])

    fixture = {
        "command": " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable), *sys.argv]),
        "llama_cpp_python": llama_cpp.__version__,
        "model_file": os.path.basename(args.model),
        "model_sha256": sha256(args.model),
        "weights": "dequantized to F32 for llama.cpp" if args.dequantize else "as stored",
        "kv_cache": "f16",
        "n_ctx": args.n_ctx,
        "text_file": os.path.basename(args.text_file),
        "text_offset": args.text_offset,
        "text": text,
        "text_ids": [int(i) for i in all_ids],
        "ids": [int(i) for i in ids],
        "vocab_size": int(logits.shape[1]),
        "top_k": args.top_k,
        "top_ids": top_ids,
        "top_logits": top_vals,
        "mean": [round(float(x), 5) for x in logits.mean(axis=1)],
        "std": [round(float(x), 5) for x in logits.std(axis=1)],
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(fixture, f, separators=(",", ":"))
        f.write("\n")
    print(f"{args.out}: {len(ids)} positions, top-{args.top_k}, {os.path.getsize(args.out)} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
