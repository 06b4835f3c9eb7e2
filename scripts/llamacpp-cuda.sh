#!/usr/bin/env bash
# llama.cpp's CUDA build as the GPU peer (issue #19): `llama-bench` from the llama.cpp tree that
# the llama-cpp-python 0.3.36 sdist vendors, built on the lent GPU machine (nvcc 13, gcc 13,
# cmake, ninja, 16 cores; it reaches no network), and timed there on the same GGUF as our
# `bench --model` (scripts' `write_random_gguf` file). A development tool, never a dependency.
#
#   scripts/llamacpp-cuda.sh stage   here: packs vendor/llama.cpp (no models/, docs/, tests/,
#                                    benches/: about 8 MB) into .device/llamacpp/src.tar.xz
#   scripts/llamacpp-cuda.sh build   on the GPU machine, from the repository root: builds
#                                    llama-bench into /tmp/llamacpp-bin unless it is there or
#                                    was carried back in .device/llamacpp-bin, and copies it to
#                                    $OUT/llamacpp-bin so a later call can carry it instead of
#                                    rebuilding (the machine forgets /tmp 30 s after a call)
#
# Build flags, and why: only sm_90 (H100/H200), so one architecture is compiled; FlashAttention
# kernels for f16-f16 (always built) plus q8_0-q4_0 (`GGML_CUDA_FA_QUANTS`, the K8V4 cache we
# compare against; "all" would compile 49 pairs and overrun a 10-minute call); static ggml so
# llama-bench is one file; no curl, tests, examples or server.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${KVSPLIT_CACHE:-$HOME/.cache/kvsplit-mlx}"
VERSION=0.3.36
say() { printf '[llamacpp-cuda] %s\n' "$*" >&2; }

stage() {
  local sdist="" d
  for d in "$CACHE/downloads" "${KVSPLIT_PEERS:-$HOME/.cache/kvsplit-mlx-peers}/downloads"; do
    [ -f "$d/llama_cpp_python-$VERSION.tar.gz" ] && { sdist="$d/llama_cpp_python-$VERSION.tar.gz"; break; }
  done
  if [ -z "$sdist" ]; then
    say "no llama_cpp_python-$VERSION.tar.gz in $CACHE/downloads: run scripts/fetch-test-data.sh first" && exit 1
  fi
  mkdir -p "$ROOT/.device/llamacpp"
  local tmp
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' RETURN
  tar -C "$tmp" -xzf "$sdist" "llama_cpp_python-$VERSION/vendor/llama.cpp"
  tar -C "$tmp/llama_cpp_python-$VERSION/vendor" \
    --exclude=llama.cpp/models --exclude=llama.cpp/docs --exclude=llama.cpp/tests \
    --exclude=llama.cpp/benches --exclude='llama.cpp/.git*' -cf - llama.cpp |
    xz -6 -T0 > "$ROOT/.device/llamacpp/src.tar.xz"
  say "staged $(du -h "$ROOT/.device/llamacpp/src.tar.xz" | cut -f1): carry .device/llamacpp, then run"
  say "  scripts/llamacpp-cuda.sh build && /tmp/llamacpp-bin/llama-bench -m FILE -p 512 -n 64 -d 4096,32768 -fa 1 -ctk q8_0 -ctv q4_0"
}

build() {
  local bin=/tmp/llamacpp-bin
  if [ ! -x "$bin/llama-bench" ] && [ -x "$ROOT/.device/llamacpp-bin/llama-bench" ]; then
    mkdir -p "$bin" && cp "$ROOT/.device/llamacpp-bin/llama-bench" "$bin/"
  fi
  if [ ! -x "$bin/llama-bench" ]; then
    [ -f "$ROOT/.device/llamacpp/src.tar.xz" ] || { say "no .device/llamacpp/src.tar.xz: run 'stage' here and carry it"; exit 1; }
    local src=/tmp/llamacpp-src
    rm -rf "$src" && mkdir -p "$src"
    tar -C "$src" -xJf "$ROOT/.device/llamacpp/src.tar.xz"
    local t0=$SECONDS
    cmake -S "$src/llama.cpp" -B "$src/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_FA_QUANTS=q8_0-q4_0 \
      -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
      -DLLAMA_BUILD_SERVER=OFF ${LLAMACPP_CMAKE_ARGS:-} > "$src/configure.log"
    cmake --build "$src/build" --target llama-bench -j "$(nproc)" > "$src/build.log"
    mkdir -p "$bin" && cp "$src/build/bin/llama-bench" "$bin/"
    say "built llama-bench in $((SECONDS - t0)) s"
  fi
  if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT/llamacpp-bin" && cp "$bin/llama-bench" "$OUT/llamacpp-bin/"
  fi
  "$bin/llama-bench" --help > /dev/null
  echo "$bin/llama-bench"
}

case "${1:-}" in
  stage) stage ;;
  build) build ;;
  *) echo "usage: scripts/llamacpp-cuda.sh stage|build" >&2; exit 2 ;;
esac
