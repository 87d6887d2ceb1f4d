"""vLLM from the tests: vLLM lives in ``.venv-vllm`` (scripts/setup.sh; it pins transformers below the
training stack's), so the tests run it in subprocesses of that environment's python
(``$SO8T_VLLM_PYTHON`` to use another). A missing environment fails the test, it is never skipped.

vLLM starts an EngineCore process and a worker under the process it runs in; a kill -9 of that process
alone leaves them running (measured: still busy 65 s later), so every vLLM process is started through
tests/child_processes.py, which kills the whole tree when the test is done with it.

Run as a script (``python tests/vllm_helpers.py REQUEST.json RESULT.json``, in ``.venv-vllm``) it is the
generation side of tests/test_vllm.py: greedy tokens and their log-probabilities for each prompt.
"""

import json
import os
import sys
from pathlib import Path

import child_processes

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("SO8T_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
VLLM_SO8T = VLLM_PYTHON.parent / "so8t"
# Engine start: 25 s on an idle 2-core machine, up to 140 s measured on a loaded one.
ENGINE_START_S = 420


def require_vllm() -> Path:
    assert VLLM_PYTHON.is_file(), f"{VLLM_PYTHON} is missing: run bash scripts/setup.sh (it creates .venv-vllm)"
    return VLLM_PYTHON


def vllm_environment(tmp_path: Path) -> dict:
    """Small, offline, float32-friendly settings for a test engine on CPU."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               VLLM_CACHE_ROOT=str(tmp_path / "vllm-cache"), SO8T_BACKEND="cpp",  # the C++ build .venv made
               SO8T_CACHE_DIR=os.environ.get("SO8T_CACHE_DIR", str(Path.home() / ".cache" / "so8t")))
    return env


def generate_greedy(model_dir: Path, prompts: list[list[int]], new_tokens: int, tmp_path: Path) -> dict:
    """{"tokens": [[id, …] per prompt], "logprobs": [[lp of each token] per prompt], "backend": …} from
    vLLM (float32, eager, EOS ignored), in a .venv-vllm subprocess."""
    request, result = tmp_path / f"{model_dir.name}-request.json", tmp_path / f"{model_dir.name}-result.json"
    request.write_text(json.dumps({"model": str(model_dir), "prompts": prompts, "new_tokens": new_tokens}))
    done = child_processes.run([str(require_vllm()), __file__, str(request), str(result)], ENGINE_START_S + 300,
                               env=vllm_environment(tmp_path))
    assert done.returncode == 0 and result.is_file(), (done.stdout + done.stderr)[-4000:]
    return json.loads(result.read_text())


def _main(request_file: str, result_file: str) -> None:
    from vllm import LLM, SamplingParams

    from so8t_kernels._backend import choose_backend

    request = json.loads(Path(request_file).read_text())
    llm = LLM(model=request["model"], dtype="float32", enforce_eager=True, max_model_len=512, seed=0)
    params = SamplingParams(max_tokens=request["new_tokens"], temperature=0.0, ignore_eos=True, logprobs=0)
    # use_tqdm=False: vLLM 0.32 divides by its progress bar's elapsed time, 0 under TQDM_DISABLE=1:
    # ZeroDivisionError.
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in request["prompts"]], params, use_tqdm=False)
    tokens = [list(output.outputs[0].token_ids) for output in outputs]
    logprobs = [[step[token].logprob for step, token in zip(output.outputs[0].logprobs, ids)]
                for output, ids in zip(outputs, tokens)]
    import torch

    backend = choose_backend("so8_rotate", torch.device("cpu"))
    Path(result_file).write_text(json.dumps({"tokens": tokens, "logprobs": logprobs, "backend": backend}))


if __name__ == "__main__":
    _main(*sys.argv[1:])
