#!/usr/bin/env bash
# Puts Debian's OpenBLAS under the file names of the reference BLAS/LAPACK that MLX's CPU wheel
# bundles (about 5 GFLOP/s for an f32 matmul here; OpenBLAS is 15x faster). The package is
# unpacked with dpkg-deb, not installed, so this needs no root. The originals are kept as
# *.orig, libopenblas.so.0 goes beside them (libblas.so.3 has RUNPATH $ORIGIN), and a
# `.openblas` marker makes later calls a no-op. Used by setup.sh (our MLX) and
# cpu-side-by-side.sh (mlx-lm's MLX), so both engines get the same BLAS.
#
# Usage: scripts/openblas-swap.sh LIBS_DIR CACHE_DIR   (LIBS_DIR: a wheel's mlx_cpu.libs)
# Exit status 0 when LIBS_DIR uses OpenBLAS afterwards, 1 when the package could not be had.
set -euo pipefail
libs=$1 cache=$2
[ -f "$libs/.openblas" ] && exit 0
deb_dir="$cache/downloads/openblas"
if ! ls "$deb_dir"/libopenblas0-pthread_*.deb >/dev/null 2>&1; then
  mkdir -p "$deb_dir"
  if command -v apt-get >/dev/null; then
    (cd "$deb_dir" && apt-get download libopenblas0-pthread >/dev/null 2>&1) ||
      { [ "$(id -u)" = 0 ] && apt-get update -qq >/dev/null 2>&1 && (cd "$deb_dir" && apt-get download libopenblas0-pthread >/dev/null 2>&1); } || true
  fi
fi
deb=$(ls "$deb_dir"/libopenblas0-pthread_*.deb 2>/dev/null | head -n1 || true)
[ -n "$deb" ] || exit 1
x=$(mktemp -d) && trap 'rm -rf "$x"' EXIT
dpkg-deb -x "$deb" "$x"
ob=$(dirname "$(find "$x" -path '*openblas-pthread/libblas.so.3' | head -n1)")
for kind in blas lapack; do
  f=$(ls "$libs"/lib$kind-*.so.3.10.0 | head -n1)
  [ -f "$f.orig" ] || cp "$f" "$f.orig"
  cp "$ob/lib$kind.so.3" "$f"
done
cp -L "$ob/libopenblas.so.0" "$libs/libopenblas.so.0"
touch "$libs/.openblas"
echo "$(basename "$deb")"
