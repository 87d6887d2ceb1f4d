"""A base model and its tokenizer: a hub id, a local directory or a ``.gguf`` file (see so8t.models.source)
or the random demo (``demo``), as a causal LM or as a sequence classifier. One function, ``load_model_and_tokenizer``,
so every way in (training, generation, serving, export) goes through the same checks.

It runs no forward: an inference forward of a 4-bit model on a CPU with avx512_bf16 repacks its weights
in a form the backward pass cannot use, and training then gets zero LoRA gradients.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
)

from ..errors import SO8TError
from .demo import build_demo_tokenizer, demo_model_config
from .source import DEMO_MODEL, resolve_model_source


def _quantization_config() -> BitsAndBytesConfig:
    # bitsandbytes computes in fp32 on CPU; bf16 is the fast (and documented) compute dtype on GPU.
    compute_dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def _device_map():
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return "cpu"


def _label_kwargs(labels: Sequence[str] | None) -> dict:
    if labels is None:
        return {}
    return dict(num_labels=len(labels), id2label=dict(enumerate(labels)),
                label2id={label: index for index, label in enumerate(labels)})


def _from_pretrained(auto_class, source: str, dtype: torch.dtype, load_in_4bit: bool, labels: Sequence[str] | None):
    kwargs = {"dtype": dtype, **_label_kwargs(labels)}
    if load_in_4bit:
        kwargs.update(quantization_config=_quantization_config(), device_map=_device_map())
    return auto_class.from_pretrained(source, **kwargs)


def load_model_and_tokenizer(model: str = DEMO_MODEL, *, dtype: torch.dtype = torch.float32,
                             load_in_4bit: bool = False, seed: int = 0, labels: Sequence[str] | None = None,
                             demo_overrides: dict | None = None):
    """The base model ``model`` names (``demo``: the random demo, its weights drawn with ``seed``; commands
    resolve their default model with ``so8t.models.source.check_model`` first) and its tokenizer, in ``dtype``, 4-bit NF4 with ``load_in_4bit``.

    ``labels``: a sequence classifier with these classes (its head freshly initialised); None: a causal LM.
    ``demo_overrides`` change the demo's Phi3Config, e.g. to Phi-3-mini shapes for a benchmark.
    The tokenizer always has a pad token (the EOS token when the model defines none).
    """
    auto_class = AutoModelForCausalLM if labels is None else AutoModelForSequenceClassification
    if model == DEMO_MODEL:
        tokenizer = build_demo_tokenizer()
        torch.manual_seed(seed)
        config = demo_model_config(tokenizer, **_label_kwargs(labels), **(demo_overrides or {}))
        # Built in its final dtype: at Phi-3-mini shapes an fp32 copy first would be 15 GB.
        demo = auto_class.from_config(config, dtype=dtype)
        if load_in_4bit:  # bitsandbytes quantizes while loading: go through a checkpoint
            with tempfile.TemporaryDirectory() as checkpoint:
                demo.save_pretrained(checkpoint)
                demo = _from_pretrained(auto_class, checkpoint, dtype, True, labels)
            # Named as a from-config model again: peft records the name in adapter_config.json and,
            # when saving, looks for that deleted directory's config.json and warns that it is gone.
            demo.name_or_path = demo.config.name_or_path = ""
        return demo, tokenizer
    # A .gguf file becomes its converted directory (cached). adapter_config.json records the name
    # loaded: an absolute path keeps the adapter loadable from anywhere.
    source = resolve_model_source(model)
    source = str(Path(source).resolve()) if Path(source).is_dir() else source
    what = "" if labels is None else " as a sequence classifier"
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        loaded = _from_pretrained(auto_class, source, dtype, load_in_4bit, labels)
    except (OSError, ValueError) as error:
        raise SO8TError(f"cannot load --model {model}{what}: {error}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if labels is not None:  # the classifier pools the last token that is not padding
        loaded.config.pad_token_id = tokenizer.pad_token_id
    return loaded, tokenizer
