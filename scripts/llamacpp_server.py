"""llama-cpp-python's OpenAI-compatible server (`python -m llama_cpp.server`, same arguments),
with llama.cpp's extra weight buffer types turned off (`use_extra_bufts = false`, what
llama.cpp's own `llama-server --no-repack` sets). Used by scripts/serve-peers-bench.sh.

Why: see scripts/llamacpp_no_repack.py (the AMX repack crashes on this project's Xeon); the
default model parameters are patched before the server builds its model.

    PYTHON_OF_THE_LLAMACPP_VENV scripts/llamacpp_server.py --model X.gguf --port N ...
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llamacpp_no_repack  # noqa: E402

llamacpp_no_repack.install()

from llama_cpp.server.__main__ import main  # noqa: E402

if __name__ == "__main__":
    main()
