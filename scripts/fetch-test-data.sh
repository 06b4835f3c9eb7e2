#!/usr/bin/env bash
# Fetch tokenizer test data: the vocab-only GGUFs (ggml-vocab-*.gguf) and their expected-token
# files (.gguf.inp / .gguf.out) that llama.cpp ships in vendor/llama.cpp/models/.
# They come from the llama-cpp-python sdist on PyPI (the hub and GitHub are out of reach).
# Only the sdist is downloaded; it is never built. Idempotent: a second run is a no-op.
#   output: ${KVSPLIT_CACHE:-$HOME/.cache/kvsplit-mlx}/testdata/llama-vocab/
set -euo pipefail

CACHE="${KVSPLIT_CACHE:-$HOME/.cache/kvsplit-mlx}"
VERSION=0.3.36
DEST="$CACHE/testdata/llama-vocab"
STAMP="$DEST/.llama-cpp-python-$VERSION"
PY="${PYTHON:-python3}"
say() { printf '[fetch-test-data] %s\n' "$*" >&2; }

if [ -f "$STAMP" ]; then
  say "already present in $DEST"
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
