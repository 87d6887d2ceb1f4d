"""The vLLM engine: generation through vLLM's AsyncLLM on an exported folder (``so8t export``; the gated
architectures come from the so8t.vllm plugin), with continuous batching, a paged KV cache and tensor
parallelism. vLLM runs the model in its own processes (EngineCore, workers); this process keeps the
server, the safety judge, the tokenizer and each request's text.

The text is decoded here from the token ids vLLM returns, with the HF engine's rules (thinking tags kept,
other special tokens dropped, the completion cut before the first stop string, a tail that may begin one
held back), so both engines answer with the same text for the same tokens; vLLM does not detokenize.

Logit statistics: vLLM hands back the top logprobs of each step, not the logits. In ``raw_logits``
mode with one top logprob, the top entry is the step's largest logit, so ``max`` is exact; mean, std,
min and the non-finite count need the whole vocabulary (``logprobs=-1`` measured ~0.55 s per token on a
2-core CPU, ~20× decoding) and are None.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
from collections.abc import AsyncIterator
from pathlib import Path

from ...errors import SO8TError
from ..thinking import partial_tail
from .base import CANCELLED, LENGTH, STOP, Completion, Engine, EngineRequest, LogitStats, TextDelta

log = logging.getLogger("so8t.serve")

REPLACEMENT = "\ufffd"  # an unfinished UTF-8 character, as decoding shows it (see hf_batch)
FINISH_REASONS = {"stop": STOP, "length": LENGTH, "abort": CANCELLED}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
KV_CACHE_SHARE_OF_RAM = 4  # at most a quarter of the machine's memory, the judge and the server need the rest


def cpu_kv_cache_bytes(config: dict, max_batch: int, total_memory: int, max_model_len: int | None = None) -> int:
    """The KV cache a CPU server gets unless VLLM_CPU_KVCACHE_SPACE says otherwise: ``max_batch`` sequences
    of ``max_model_len`` tokens (default: the model's whole context), at most a quarter of the memory,
    never less than one whole sequence.

    vLLM's own CPU default reserves 92 % of the memory and refuses to start when anything else already
    uses more than 8 % of it (measured: beside a running HF server, "Available memory … is less than
    desired CPU memory utilization"); given alone it took 20 GiB of 23.5 for SmolLM2-135M. One token of
    SmolLM2 in float32 holds 45 KiB of keys and values (30 layers × 3 KV heads × 64 × 2 × 4 bytes)."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    per_token = 2 * config["num_hidden_layers"] * kv_heads * head_dim * DTYPE_BYTES.get(dtype, 4)
    one_sequence = per_token * (max_model_len or config["max_position_embeddings"])
    return max(one_sequence, min(one_sequence * max_batch, total_memory // KV_CACHE_SHARE_OF_RAM))


class VLLMEngine(Engine):
    def __init__(self, llm, model_dir: Path, name: str):
        from transformers import AutoTokenizer

        from ...data.dataset import THINK_CLOSE, THINK_OPEN
        from ...models.export import read_gate_activations

        self.llm = llm
        self.model_dir = model_dir
        self.name = name
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.context_length = llm.model_config.max_model_len
        self.sigma_alpha = read_gate_activations(model_dir)
        self.gated_layers = sorted(self.sigma_alpha)
        thinking_tags = set(self.tokenizer.convert_tokens_to_ids([THINK_OPEN, THINK_CLOSE])) - {self.tokenizer.unk_token_id}
        self.dropped_ids = set(self.tokenizer.all_special_ids) - thinking_tags
        self.eos_token_ids = end_token_ids(model_dir, self.tokenizer.eos_token_id)
        self._running: set[str] = set()
        self._cancelled: set[str] = set()

    @classmethod
    def load(cls, model: str | None = None, adapter: str | None = None, name: str | None = None,
             max_batch: int = 16, tensor_parallel_size: int = 1, enforce_eager: bool = False,
             max_model_len: int | None = None) -> VLLMEngine:
        """The engine on ``--model`` (an exported folder, or any model folder vLLM loads), or on the export
        of ``--adapter RUN`` (``--model``: its base, where the recorded one moved), made into so8t's cache
        on first use. ``max_batch`` is vLLM's ``max_num_seqs``."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from ...models.export import cached_export, inspect_run
        from ...models.inference import served_model_name

        if adapter is not None:
            name = name or served_model_name(inspect_run(adapter, model).base, adapter)
            model_dir = cached_export(adapter, model=model)
        elif model is not None and Path(model).expanduser().is_dir():
            model_dir = Path(model).expanduser().resolve()
            name = name or served_model_name(str(model_dir), None)
        else:
            raise SO8TError("--engine vllm serves a model folder: --model DIR (e.g. written by so8t export), "
                            "or --adapter RUN to export a so8t train run first")
        config = json.loads((model_dir / "config.json").read_text())
        args = AsyncEngineArgs(
            model=str(model_dir),
            served_model_name=name,
            # The export's own dtype: vLLM's "auto" would serve a float32 export in bfloat16 on CPU.
            dtype=config.get("dtype") or config.get("torch_dtype") or "auto",
            tensor_parallel_size=tensor_parallel_size,
            max_num_seqs=max_batch,
            enforce_eager=enforce_eager,
            max_model_len=max_model_len,  # None: the model's context
            # Sampling as requested, nothing from generation_config.json (e.g. a repetition penalty the
            # HF engine would not apply either).
            generation_config="vllm",
            max_logprobs=1,
            logprobs_mode="raw_logits",
            disable_log_stats=True,
            **_cpu_memory(config, max_batch, max_model_len),
        )
        return cls(AsyncLLM.from_engine_args(args), model_dir, name)

    def stream(self, request: EngineRequest) -> AsyncIterator[TextDelta | Completion]:
        return self._events(request)

    async def _events(self, request: EngineRequest) -> AsyncIterator[TextDelta | Completion]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        sampling = request.sampling
        params = SamplingParams(
            max_tokens=sampling.max_new_tokens,
            temperature=0.0 if sampling.greedy else sampling.temperature,
            top_p=sampling.top_p,
            logprobs=1,
            detokenize=False,
            output_kind=RequestOutputKind.DELTA,
            stop_token_ids=self.eos_token_ids,
        )
        request_id = request.request_id
        self._running.add(request_id)
        outputs = self.llm.generate(TokensPrompt(prompt_token_ids=request.prompt.ids), params, request_id)
        ids: list[int] = []
        text, sent, finish_reason = "", "", None
        top_logit = -math.inf
        try:
            async for output in outputs:
                completion = output.outputs[0]
                ids.extend(completion.token_ids)
                for step in completion.logprobs or ():
                    top_logit = max(top_logit, max(entry.logprob for entry in step.values()))
                text = self.decode_text(ids)
                cut = min((at for at in (text.find(stop) for stop in sampling.stop) if at != -1), default=-1)
                if cut != -1:
                    text, finish_reason = text[:cut], STOP
                elif completion.finish_reason is not None:
                    if completion.finish_reason not in FINISH_REASONS:  # "error": vLLM failed the request
                        raise RuntimeError(f"vLLM ended request {request_id} with finish reason "
                                           f"{completion.finish_reason!r}")
                    finish_reason = FINISH_REASONS[completion.finish_reason]
                elif request_id in self._cancelled:
                    finish_reason = CANCELLED
                if finish_reason is not None:
                    break
                complete = text.removesuffix(REPLACEMENT)
                complete = complete[:len(complete) - partial_tail(complete, sampling.stop)]
                if len(complete) > len(sent):
                    yield TextDelta(complete[len(sent):])
                    sent = complete
        finally:
            await outputs.aclose()  # vLLM aborts the request if it is still running
            self._running.discard(request_id)
            self._cancelled.discard(request_id)
        if finish_reason is None:  # vLLM ended the stream without a reason (aborted)
            finish_reason = CANCELLED
        if finish_reason != CANCELLED and len(text) > len(sent):
            yield TextDelta(text[len(sent):])
        stats = LogitStats(None, None, None, top_logit, None) if ids else None
        yield Completion(text=text, prompt_tokens=len(request.prompt.ids), new_tokens=len(ids),
                         finish_reason=finish_reason, logit_stats=stats, sigma_alpha=self.sigma_alpha)

    def decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode([token for token in ids if token not in self.dropped_ids],
                                     skip_special_tokens=False)

    def cancel(self, request_id: str) -> None:
        if request_id not in self._running:  # finished (every stream's end cancels), or never started
            return
        self._cancelled.add(request_id)
        with contextlib.suppress(RuntimeError):  # no running loop: nothing is generating
            asyncio.get_running_loop().create_task(self.llm.abort(request_id))

    def shutdown(self) -> None:
        self.llm.shutdown()


def end_token_ids(model_dir: Path, tokenizer_eos: int | None) -> list[int]:
    """The ids that end an answer, as the HF engine stops: the export's generation config's
    ``eos_token_id`` (one id or a list: Phi-3-mini's lists 32000, 32001 and 32007, its ``<|end|>``) and the
    tokenizer's end token. vLLM, given ``generation_config="vllm"``, would stop at the tokenizer's alone."""
    path = model_dir / "generation_config.json"
    configured = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
    ids = configured if isinstance(configured, list) else [configured] if configured is not None else []
    return sorted({int(token) for token in ids} | ({tokenizer_eos} if tokenizer_eos is not None else set()))


def _cpu_memory(config: dict, max_batch: int, max_model_len: int | None) -> dict:
    """vLLM's KV cache size on a CPU (cpu_kv_cache_bytes) unless VLLM_CPU_KVCACHE_SPACE (GiB) is set."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or "VLLM_CPU_KVCACHE_SPACE" in os.environ:
        return {}
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    size = cpu_kv_cache_bytes(config, max_batch, memory, max_model_len)
    log.info("vLLM KV cache on CPU: %.2f GiB (VLLM_CPU_KVCACHE_SPACE=GiB sets another size)", size / 2**30)
    return {"kv_cache_memory_bytes": size}
