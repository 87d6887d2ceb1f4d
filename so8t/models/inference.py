"""The model ``so8t generate`` and ``so8t serve`` run, from ``--model`` and ``--adapter``.

- ``demo``: the random demo base of ``so8t train --model demo``, rebuilt from the seed the adapter's run
  recorded (``embedded_base.json``; seed 0 without an adapter), so the same weights.
- ``--adapter DIR``: a ``so8t train`` output: LoRA (merged into the base for speed), the SO8T gates of
  ``DIR/so8t`` (none for a run trained with ``--no-so8t``, which has no ``so8t/``), and the tokenizer
  saved next to them.
- Without an adapter the gates come from ``MODEL/so8t`` if there is one; the demo gets fresh gates
  (θ = 0, so they leave its outputs unchanged), the model ``so8t train --model demo`` starts from.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SO8TError
from ..gates.adapter import SO8T_ADAPTER_DIR, load_so8t_adapter
from ..gates.config import SO8TConfig
from ..gates.placement import attach_so8t
from .demo import DEMO_MODEL_NAME, DEMO_SEED
from .loading import load_model_and_tokenizer
from .run_base import PEFT_CONFIG_FILE, converted_name, embedded_base_record
from .source import DEMO_MODEL

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# A GGUF file's name ends with its quantization (SmolLM2-135M-Instruct.Q4_1.gguf): not part of the model's name.
_GGUF_QUANTIZATION = re.compile(r"[.-](q\d\w*|i?q\d\w*|f16|f32|bf16)$", re.IGNORECASE)


def served_model_name(model: str, adapter: str | None) -> str:
    """A short name for clients, from the model and the adapter: the model file's or directory's name
    (a hub id's last part; a converted ``.gguf`` directory's file) without ``.gguf`` and its quantization,
    then ``+`` and the adapter directory's name, lowercased: ``smollm2-135m-instruct+run-20261204``."""
    if model == DEMO_MODEL:
        name = DEMO_MODEL_NAME
    else:
        path = Path(model).expanduser()
        name = converted_name(path) or (path.resolve() if path.exists() else path).name
        if name.lower().endswith(".gguf"):
            name = _GGUF_QUANTIZATION.sub("", name[:-len(".gguf")])
    if adapter is not None:
        name += "+" + Path(adapter).expanduser().resolve().name
    return re.sub(r"\s+", "-", name.lower())


def _embedded_base_seed(adapter_dir: Path | None) -> int:
    record = embedded_base_record(adapter_dir) if adapter_dir is not None else None
    if record is None or not record.is_file():
        return DEMO_SEED
    try:
        return int(json.loads(record.read_text())["seed"])
    except (ValueError, KeyError, TypeError) as error:
        raise SO8TError(f"{record}: unreadable embedded base record ({error})") from None


@dataclass
class InferenceModel:
    model: torch.nn.Module  # LoRA merged, gates attached (``handle``) when the run has them
    tokenizer: object
    handle: object | None  # so8t.gates.placement.SO8THandle
    name: str  # served_model_name of the model and adapter


def load_for_inference(model: str = DEMO_MODEL, adapter: str | None = None) -> InferenceModel:
    """``model`` as so8t.models.source.check_model makes it concrete (``demo``, a path or a hub id)."""
    adapter_dir = Path(adapter) if adapter is not None else None
    if adapter_dir is not None and not adapter_dir.is_dir():
        raise SO8TError(f"--adapter {adapter}: no such directory")
    seed = _embedded_base_seed(adapter_dir) if model == DEMO_MODEL else DEMO_SEED
    base, tokenizer = load_model_and_tokenizer(model, seed=seed)
    if adapter_dir is not None:
        if any((adapter_dir / name).is_file() for name in TOKENIZER_FILES):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
        if (adapter_dir / PEFT_CONFIG_FILE).is_file():
            from peft import PeftModel

            base = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
        gates_dir = adapter_dir / SO8T_ADAPTER_DIR
    else:
        gates_dir = Path(model) / SO8T_ADAPTER_DIR if model != DEMO_MODEL else None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if gates_dir is not None and gates_dir.is_dir():
        handle = load_so8t_adapter(base, gates_dir)
    elif model == DEMO_MODEL and adapter_dir is None:
        handle = attach_so8t(base, SO8TConfig())
    else:
        handle = None
    if torch.cuda.is_available():
        base = base.to("cuda")
    return InferenceModel(base, tokenizer, handle, served_model_name(model, adapter))
