#!/usr/bin/env bash
# llama.cpp's own `llama-server`, built from the llama.cpp tree that the llama-cpp-python
# 0.3.36 sdist vendors (vendor/llama.cpp; PyPI is reachable, GitHub is not), for
# scripts/loadtest-bench.sh. A development tool, like the other peers (scripts/peers-env.sh):
# it lives under $KVSPLIT_PEERS (default ~/.cache/kvsplit-mlx-peers), never in the project.
#
#   scripts/llama-server-build.sh      prints the binary's path (builds it first if missing)
#
# The binary is cached at $KVSPLIT_PEERS/llama-server-0.3.36/llama-server with a marker file
# (.built: version, CMake flags, compiler, build seconds); when both are there nothing is
# downloaded or built. Otherwise:
#   1. the sdist: $KVSPLIT_PEERS/downloads/llama_cpp_python-0.3.36.tar.gz, copied from
#      $KVSPLIT_CACHE/downloads when scripts/fetch-test-data.sh already fetched it there, else
#      `pip download --no-binary :all: --no-deps` (pip prepares an sdist's metadata even to
#      download it, which needs scikit-build-core and cmake: both come from wheels in the build
#      venv, and pip runs with --no-build-isolation; nothing is compiled for that step);
#   2. CMake from PyPI's `cmake` wheel, in a venv ($KVSPLIT_PEERS/llama-server-build-venv);
#   3. only the llama-server target: Release, -DGGML_NATIVE=ON (the build machine's own
#      instruction set: AVX-512 and AMX on this project's Xeon), -DLLAMA_CURL=OFF, static
#      libraries (one self-contained binary), no tests or examples, -j$(nproc);
#      LLAMA_SERVER_CMAKE_ARGS adds or overrides flags (e.g. "-DGGML_NATIVE=OFF -DGGML_AVX2=ON").
# Run llama-server with --no-repack on this machine: llama.cpp's CPU weight repacking (the AMX
# buffer) crashes on the first evaluation here (docs/cpu-side-by-side.md).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${KVSPLIT_CACHE:-$HOME/.cache/kvsplit-mlx}"
PY="${PYTHON:-python3}"
say() { printf '[llama-server-build] %s\n' "$*" >&2; }
. "$ROOT/scripts/peers-env.sh"   # PEERS, LLAMACPP_VERSION
DEST="$PEERS/llama-server-$LLAMACPP_VERSION"
BIN="$DEST/llama-server"
MARK="$DEST/.built"
built() { [ -x "$BIN" ] && [ -f "$MARK" ]; }
if built; then echo "$BIN"; exit 0; fi

mkdir -p "$PEERS/downloads" "$DEST"
# One build at a time; a second caller waits and then finds the binary.
exec 9>"$PEERS/llama-server-$LLAMACPP_VERSION.lock"
flock 9
if built; then echo "$BIN"; exit 0; fi

VENV="$PEERS/llama-server-build-venv"
if ! "$VENV/bin/python" -c 'import cmake, scikit_build_core' 2>/dev/null; then
  say "creating $VENV with cmake and scikit-build-core (wheels from PyPI)"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --only-binary :all: cmake scikit-build-core
fi
CMAKE="$VENV/bin/cmake"

SDIST="$PEERS/downloads/llama_cpp_python-$LLAMACPP_VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
  if [ -f "$CACHE/downloads/llama_cpp_python-$LLAMACPP_VERSION.tar.gz" ]; then
    say "copying the sdist fetched earlier from $CACHE/downloads"
    cp "$CACHE/downloads/llama_cpp_python-$LLAMACPP_VERSION.tar.gz" "$SDIST.tmp" && mv "$SDIST.tmp" "$SDIST"
  else
    say "downloading the llama-cpp-python==$LLAMACPP_VERSION sdist from PyPI (download only)"
    PATH="$VENV/bin:$PATH" "$VENV/bin/python" -m pip download -q --disable-pip-version-check --no-deps \
      --no-build-isolation --no-binary :all: -d "$PEERS/downloads" "llama-cpp-python==$LLAMACPP_VERSION"
  fi
fi
[ -f "$SDIST" ] || { echo "llama-server-build: no sdist at $SDIST" >&2; exit 1; }

WORK="$DEST/work"
rm -rf "$WORK" && mkdir -p "$WORK"
trap 'rm -rf "$WORK"' EXIT
say "extracting vendor/llama.cpp from $(basename "$SDIST")"
tar -xzf "$SDIST" -C "$WORK" --wildcards "llama_cpp_python-$LLAMACPP_VERSION/vendor/llama.cpp/*"
SRC="$WORK/llama_cpp_python-$LLAMACPP_VERSION/vendor/llama.cpp"
[ -f "$SRC/CMakeLists.txt" ] || { echo "llama-server-build: no CMakeLists.txt in $SRC" >&2; exit 1; }

read -r -a EXTRA <<<"${LLAMA_SERVER_CMAKE_ARGS:-}"
FLAGS=(-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF
       -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON
       "${EXTRA[@]}")
JOBS=$(nproc)
say "building llama-server ($("$CMAKE" --version | head -n1), ${FLAGS[*]}, -j$JOBS): several minutes on 2 cores"
t0=$(date +%s)
"$CMAKE" -S "$SRC" -B "$WORK/build" "${FLAGS[@]}" >"$WORK/configure.log" 2>&1 ||
  { tail -n 40 "$WORK/configure.log" >&2; echo "llama-server-build: CMake configure failed" >&2; exit 1; }
"$CMAKE" --build "$WORK/build" --target llama-server -j "$JOBS" >"$WORK/build.log" 2>&1 ||
  { tail -n 40 "$WORK/build.log" >&2; echo "llama-server-build: the build failed" >&2; exit 1; }
secs=$(( $(date +%s) - t0 ))
OUTBIN=$(find "$WORK/build" -type f -name llama-server -perm -u+x | head -n1)
[ -n "$OUTBIN" ] || { echo "llama-server-build: no llama-server binary after the build" >&2; exit 1; }
cp "$OUTBIN" "$BIN.tmp" && mv "$BIN.tmp" "$BIN"
cp "$WORK/configure.log" "$DEST/configure.log"
tail -n 200 "$WORK/build.log" >"$DEST/build.log.tail"
{
  echo "llama-cpp-python $LLAMACPP_VERSION sdist, vendor/llama.cpp"
  echo "$("$BIN" --version 2>&1 | grep -m1 '^version:' || echo 'version: unknown')"
  echo "ggml: $(sed -n 's/^-- ggml version: *//p' "$WORK/configure.log" | head -n1)"
  echo "cmake flags: ${FLAGS[*]}"
  echo "cmake: $("$CMAKE" --version | head -n1)"
  echo "compiler: $(c++ --version | head -n1)"
  echo "jobs: $JOBS"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) / $(nproc) cores"
  echo "build_seconds: $secs"
  echo "date: $(date -u +%FT%TZ)"
} >"$MARK"
say "built in ${secs}s: $BIN"
echo "$BIN"
