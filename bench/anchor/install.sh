#!/usr/bin/env bash
# Install the llama.cpp anchor (llama-cpp-python) exactly as shared/docs/anchors.md says:
# version 0.3.36 built from its PyPI source package with CMAKE_ARGS=-DGGML_NATIVE=ON, so that
# ggml is compiled for this CPU (AVX-512 on the Zen 4 machines). About 4+ minutes on 2 cores.
#
# Idempotent: does nothing when `import llama_cpp` already works and reports the pinned version.
# Usage: bench/anchor/install.sh            (PYTHON=python3 by default)
set -euo pipefail

PYTHON="${PYTHON:-python3}"
VERSION="0.3.36"

have="$("$PYTHON" -c 'import llama_cpp; print(llama_cpp.__version__)' 2>/dev/null || true)"
if [ "$have" = "$VERSION" ]; then
    echo "llama-cpp-python $VERSION already installed; nothing to do"
    exit 0
fi
if [ -n "$have" ]; then
    echo "llama-cpp-python $have installed, replacing it with $VERSION"
fi

# The build needs a C/C++ compiler; cmake and ninja come from PyPI through the build isolation.
if ! command -v g++ >/dev/null 2>&1 && ! command -v c++ >/dev/null 2>&1; then
    echo "installing a C++ compiler (apt-get install build-essential)"
    apt-get update -qq && apt-get install -y -qq build-essential
fi

echo "building llama-cpp-python $VERSION from source (CMAKE_ARGS=-DGGML_NATIVE=ON), takes minutes"
# --no-binary forces the sdist (no prebuilt wheel); --no-cache-dir so a wheel built elsewhere with
# other flags is never reused. No --force-reinstall: it would also reinstall numpy, jinja2, ...;
# pip replaces another installed llama-cpp-python version by itself.
CMAKE_ARGS="-DGGML_NATIVE=ON" FORCE_CMAKE=1 \
    "$PYTHON" -m pip install --no-cache-dir --no-binary llama-cpp-python \
    "llama-cpp-python==$VERSION"

got="$("$PYTHON" -c 'import llama_cpp; print(llama_cpp.__version__)')"
if [ "$got" != "$VERSION" ]; then
    echo "error: after install, llama_cpp reports version '$got', expected $VERSION" >&2
    exit 1
fi
echo "llama-cpp-python $got installed"
