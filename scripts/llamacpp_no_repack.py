"""Turns off llama.cpp's extra weight buffer types in llama-cpp-python (`use_extra_bufts =
false`, what llama.cpp's own `llama-server --no-repack` sets), for every model built after
`install()`.

Why: on this project's Intel Xeon (AVX-512, AMX), llama-cpp-python 0.3.36 built from source
repacks Q4_1 weights into its AMX buffer at load and then dies on the first evaluation (SIGSEGV
or SIGILL; docs/cpu-side-by-side.md). Without the extra buffer types the weights stay in the
plain CPU buffer and run on the AVX-512 kernels. Neither `Llama(...)` nor the server's settings
have a switch for it, so the default model parameters are patched.
"""
import llama_cpp
import llama_cpp.llama_cpp as lib

_default = lib.llama_model_default_params


def _no_extra_bufts():
    params = _default()
    params.use_extra_bufts = False
    return params


def install():
    # llama_cpp.llama reads it as llama_cpp.llama_cpp.llama_model_default_params; the package
    # re-exports the same name.
    lib.llama_model_default_params = _no_extra_bufts
    llama_cpp.llama_model_default_params = _no_extra_bufts
