#!/usr/bin/env bash
# Fetch test data from the llama-cpp-python sdist on PyPI (the hub and GitHub are out of reach):
#   - tokenizer test data: the vocab-only GGUFs (ggml-vocab-*.gguf) and their expected-token
#     files (.gguf.inp / .gguf.out) that llama.cpp ships in vendor/llama.cpp/models/;
#   - code texts for perplexity/KLD on a code model (Qwen2.5-Coder): two C++ sources of the
#     vendored llama.cpp, pinned by the sdist's version and checked by SHA-256:
#       llama-vocab.cpp  the evaluation text (186,683 bytes)
#       llama-model.cpp  the calibration text (162,018 bytes), a different file, so a method
#                        calibrated on it is never scored on its own calibration data.
#     Human-written C++ (MIT), in the domain of a code model, and on every machine that can
#     reach PyPI; WikiText-2 stays the text for the general models.
# Only the sdist is downloaded; it is never built. Idempotent: a second run is a no-op.
#   output: ${KVSPLIT_CACHE:-$HOME/.cache/kvsplit-mlx}/testdata/llama-vocab/
#           ${KVSPLIT_CACHE:-$HOME/.cache/kvsplit-mlx}/data/code/
set -euo pipefail

CACHE="${KVSPLIT_CACHE:-$HOME/.cache/kvsplit-mlx}"
VERSION=0.3.36
DEST="$CACHE/testdata/llama-vocab"
STAMP="$DEST/.llama-cpp-python-$VERSION"
CODE_DEST="$CACHE/data/code"
CODE_STAMP="$CODE_DEST/.llama-cpp-python-$VERSION"
# Path inside vendor/llama.cpp/ and SHA-256 of each code text.
CODE_FILES=(
  "src/llama-vocab.cpp 78d11bfb12269c89a3153d347c151f12d5d0ab588f508d88bfaf38a91179a4c6"
  "src/llama-model.cpp be90575de2cf5248ea42fbe7136a93325b394d3cdb7f9920e2f429f213f08493"
)
PY="${PYTHON:-python3}"
say() { printf '[fetch-test-data] %s\n' "$*" >&2; }

if [ -f "$STAMP" ] && [ -f "$CODE_STAMP" ]; then
  say "already present in $DEST and $CODE_DEST"
  exit 0
fi

mkdir -p "$CACHE/downloads"
sdist=$(ls "$CACHE"/downloads/llama_cpp_python-"$VERSION".tar.gz 2>/dev/null | head -n1 || true)
if [ -z "$sdist" ]; then
  # pip prepares an sdist's metadata even for `pip download`, which needs the build backend
  # (scikit-build-core, which also insists on finding cmake). With build isolation and
  # --no-binary pip would compile those from source, so instead: a small venv with both from
  # wheels, and --no-build-isolation. Preparing metadata runs no compiler; nothing is built.
  VENV="$CACHE/tools/fetch-test-data-venv"
  if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import scikit_build_core, cmake' 2>/dev/null; then
    say "creating $VENV with scikit-build-core (for pip's metadata step)"
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check --only-binary :all: scikit-build-core cmake
  fi
  say "downloading the llama-cpp-python==$VERSION sdist from PyPI (download only, no build)"
  PATH="$VENV/bin:$PATH" "$VENV/bin/pip" download -q --disable-pip-version-check --no-deps --no-build-isolation \
    --no-binary llama-cpp-python -d "$CACHE/downloads" "llama-cpp-python==$VERSION"
  sdist=$(ls "$CACHE"/downloads/llama_cpp_python-"$VERSION".tar.gz | head -n1)
fi

# Extract only the vocab files, into a temporary dir, then move into place atomically.
if [ ! -f "$STAMP" ]; then
  rm -rf "$DEST.tmp" && mkdir -p "$DEST.tmp"
  "$PY" - "$sdist" "$DEST.tmp" <<'PYEOF'
import os, sys, tarfile
src, dst = sys.argv[1], sys.argv[2]
n = 0
with tarfile.open(src) as tf:
    for m in tf.getmembers():
        base = os.path.basename(m.name)
        if m.isfile() and "/vendor/llama.cpp/models/" in m.name and base.startswith("ggml-vocab-"):
            with tf.extractfile(m) as f, open(os.path.join(dst, base), "wb") as out:
                out.write(f.read())
            n += 1
if n == 0:
    sys.exit("no ggml-vocab-* files found in " + src)
print(f"extracted {n} files", file=sys.stderr)
PYEOF
  rm -rf "$DEST" && mv "$DEST.tmp" "$DEST"
  touch "$STAMP"
  say "vocab files in $DEST"
fi

# The code texts: the same way, each checked against its SHA-256.
if [ ! -f "$CODE_STAMP" ]; then
  rm -rf "$CODE_DEST.tmp" && mkdir -p "$CODE_DEST.tmp"
  "$PY" - "$sdist" "$CODE_DEST.tmp" "${CODE_FILES[@]}" <<'PYEOF'
import hashlib, os, sys, tarfile
src, dst, specs = sys.argv[1], sys.argv[2], [s.split() for s in sys.argv[3:]]
want = {"vendor/llama.cpp/" + path: sha for path, sha in specs}
with tarfile.open(src) as tf:
    for m in tf.getmembers():
        rel = m.name.split("/", 1)[-1]
        if m.isfile() and rel in want:
            data = tf.extractfile(m).read()
            got = hashlib.sha256(data).hexdigest()
            if got != want[rel]:
                sys.exit(f"{rel} in {src}: SHA-256 {got}, expected {want[rel]}")
            with open(os.path.join(dst, os.path.basename(rel)), "wb") as out:
                out.write(data)
            del want[rel]
if want:
    sys.exit(f"not found in {src}: {', '.join(want)}")
PYEOF
  rm -rf "$CODE_DEST" && mv "$CODE_DEST.tmp" "$CODE_DEST"
  touch "$CODE_STAMP"
  say "code texts in $CODE_DEST"
fi
