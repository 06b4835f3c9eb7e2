# Sourced (not run) by the scripts that measure the peers: scripts/cpu-side-by-side.sh and
# scripts/serve-peers-bench.sh. The peers are development tools, installed here into venvs under
# $KVSPLIT_PEERS (default ~/.cache/kvsplit-mlx-peers), never project dependencies. They stay out
# of $KVSPLIT_CACHE, whose libraries the fresh-machine check holds to what the engine itself needs:
#   llamacpp-venv  llama-cpp-python 0.3.36 (built from its sdist: about 10 minutes on 2 cores);
#                  peers_llamacpp_venv --server adds its [server] extra (FastAPI, uvicorn, ...)
#                  without rebuilding it
#   mlxlm-venv     mlx 0.32.2 + mlx-cpu 0.32.2 (the MLX we link) + mlx-lm 0.32.2, with the wheel's
#                  reference BLAS swapped for OpenBLAS exactly as setup.sh does for ours, so both
#                  MLX users run on the same BLAS.
# pip always runs as `python -m pip`: the console scripts in a venv's bin/ carry the venv's path
# in their shebang and break when the venv directory is moved.
#
# Needs from the caller: ROOT (the repository), CACHE ($KVSPLIT_CACHE), PY (a python3 to create
# venvs with) and a `say` function for progress lines on stderr.
PEERS="${KVSPLIT_PEERS:-$HOME/.cache/kvsplit-mlx-peers}"
MLX_VERSION=0.32.2
MLXLM_VERSION=0.32.2
LLAMACPP_VERSION=0.3.36
LLAMA_VENV="$PEERS/llamacpp-venv"
MLXLM_VENV="$PEERS/mlxlm-venv"

# peers_llamacpp_venv [--server]: $LLAMA_VENV with llama-cpp-python==$LLAMACPP_VERSION, created
# (and llama.cpp built) only when missing or at another version; --server also installs the
# [server] extra's packages. pip keeps the installed llama-cpp-python, which already satisfies
# the pin, so nothing is rebuilt.
peers_llamacpp_venv() {
  if ! "$LLAMA_VENV/bin/python" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$LLAMACPP_VERSION')" 2>/dev/null; then
    say "creating $LLAMA_VENV with llama-cpp-python==$LLAMACPP_VERSION (builds llama.cpp from source: about 10 minutes)"
    rm -rf "$LLAMA_VENV"
    "$PY" -m venv "$LLAMA_VENV"
    "$LLAMA_VENV/bin/python" -m pip install -q --disable-pip-version-check "llama-cpp-python==$LLAMACPP_VERSION" numpy
  fi
  if [ "${1:-}" = --server ] &&
     ! "$LLAMA_VENV/bin/python" -c "import fastapi, uvicorn, sse_starlette, pydantic_settings, starlette_context, yaml" 2>/dev/null; then
    say "installing llama-cpp-python[server]==$LLAMACPP_VERSION's extra into $LLAMA_VENV (no rebuild)"
    "$LLAMA_VENV/bin/python" -m pip install -q --disable-pip-version-check "llama-cpp-python[server]==$LLAMACPP_VERSION"
  fi
}

# peers_mlxlm_venv: $MLXLM_VENV with mlx, mlx-cpu and mlx-lm at the pinned versions, its BLAS
# swapped for OpenBLAS (scripts/openblas-swap.sh). Sets MLXLM_BLAS_NOTE to what happened; a failed
# swap is a warning, not an error (mlx-lm then runs on the reference BLAS, and callers say so).
peers_mlxlm_venv() {
  if ! "$MLXLM_VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('mlx-lm') != '$MLXLM_VERSION' or m.version('mlx-cpu') != '$MLX_VERSION')" 2>/dev/null; then
    say "creating $MLXLM_VENV with mlx==$MLX_VERSION, mlx-cpu==$MLX_VERSION, mlx-lm==$MLXLM_VERSION"
    rm -rf "$MLXLM_VENV"
    "$PY" -m venv "$MLXLM_VENV"
    "$MLXLM_VENV/bin/python" -m pip install -q --disable-pip-version-check "mlx==$MLX_VERSION" "mlx-cpu==$MLX_VERSION" "mlx-lm==$MLXLM_VERSION"
  fi
  # The same swap as setup.sh, so both engines run on OpenBLAS.
  local libs deb
  libs="$(echo "$MLXLM_VENV"/lib/python3*/site-packages/mlx_cpu.libs)"
  if deb=$("$ROOT/scripts/openblas-swap.sh" "$libs" "$CACHE"); then
    MLXLM_BLAS_NOTE=OpenBLAS
    [ -z "$deb" ] || say "mlx-lm's MLX now uses OpenBLAS ($deb)"
  else
    MLXLM_BLAS_NOTE="reference BLAS"
    say "WARNING: could not set up Debian's OpenBLAS; mlx-lm keeps the reference BLAS (the report says so)"
  fi
}
