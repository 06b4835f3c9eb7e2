"""llama-cpp-python's OpenAI-compatible server (`python -m llama_cpp.server`, same arguments),
with llama.cpp's extra weight buffer types turned off (`use_extra_bufts = false`, what
llama.cpp's own `llama-server --no-repack` sets). Used by scripts/serve-peers-bench.sh.

Why: on this project's Intel Xeon (AMX), llama-cpp-python 0.3.36 built from source repacks the
Q4_1 weights into its AMX buffer at load and then crashes with SIGSEGV on the first evaluation
(docs/cpu-side-by-side.md). Without the extra buffer types the weights stay in the plain CPU
buffer and run on the AVX-512 kernels. The server's settings have no switch for it, so the
default model parameters are patched before the server builds its model.

    PYTHON_OF_THE_LLAMACPP_VENV scripts/llamacpp_server.py --model X.gguf --port N ...
"""
import llama_cpp
import llama_cpp.llama_cpp as lib

_default = lib.llama_model_default_params


def _no_extra_bufts():
    params = _default()
    params.use_extra_bufts = False
    return params


# llama_cpp.llama reads it as llama_cpp.llama_cpp.llama_model_default_params; the package
# re-exports the same name.
lib.llama_model_default_params = _no_extra_bufts
llama_cpp.llama_model_default_params = _no_extra_bufts

from llama_cpp.server.__main__ import main  # noqa: E402

if __name__ == "__main__":
    main()
