"""The embedded default of ``so8t train``: a small Phi-3-architecture model built from a config (random
init, nothing downloaded) and an offline byte-level tokenizer with the thinking tags as special tokens."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import Phi3Config, PreTrainedTokenizerFast

from ..data.dataset import THINK_CLOSE, THINK_OPEN
from .run_base import EMBEDDED_BASE_FILE

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"
DEMO_MODEL_NAME = "so8t-demo-phi3"  # what the demo model is called where a model name is shown
DEMO_SEED = 0  # draws the demo's weights unless a run says otherwise


def write_embedded_base_record(directory: Path, seed: int) -> None:
    """For a run on the demo, which has no checkpoint of its own: the seed that rebuilds its exact weights
    (so8t.models.run_base reads it)."""
    (directory / EMBEDDED_BASE_FILE).write_text(json.dumps({"seed": seed}) + "\n")


def build_demo_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with the 256 byte symbols and no merges: any text tokenizes, one token per byte.

    Built in memory from ``tokenizers`` (no training, no download); saves and reloads with AutoTokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {symbol: index for index, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[THINK_OPEN, THINK_CLOSE],
        model_max_length=512,
    )


def demo_model_config(tokenizer: PreTrainedTokenizerFast, **overrides) -> Phi3Config:
    """Phi-3 architecture at toy size: 6 layers (4 gated by default), hidden 128, ~1.2 M parameters.

    ``overrides`` replace any Phi3Config field, e.g. ``hidden_size=3072, num_hidden_layers=32,
    intermediate_size=8192, num_attention_heads=32, num_key_value_heads=32`` for Phi-3-mini shapes.
    """
    values = dict(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return Phi3Config(**values)

