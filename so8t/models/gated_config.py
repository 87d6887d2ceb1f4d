"""The configuration of an exported gated model (what ``so8t export`` writes into config.json).

An export of a Llama/Phi-3/Mistral/Qwen2 run has ``model_type: "so8t_llama"`` (so8t_phi3, …), its own
``architectures`` (``So8tLlamaForCausalLM``, …) and an ``so8t`` block: the gated decoder layers, the
block size, the base model and the run it came from. Its own model_type makes a loader that does not
know so8t fail loudly ("model type so8t_llama not recognized") instead of silently loading the base
without its gates, which is what transformers does with ``model_type: "llama"``: it picks the class
from the model_type, never from ``architectures``.

The gate tensors are ``model.layers.N.so8t_gate.theta`` ``[hidden/8, 28]`` and ``.alpha`` ``[]`` (fp32)
per gated layer N, names transformers and vLLM both load as they are. ``register()`` adds the config
classes to transformers' AutoConfig (``import so8t`` arranges it; the vLLM plugin calls it).
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config

from ..errors import SO8TError
from ..gates.bank import BLOCK_SIZE
from ..gates.frozen import GATE_MODULE

FORMAT_VERSION = 1
SO8T_BLOCK = "so8t"


@strict
class So8tLlamaConfig(LlamaConfig):
    model_type = "so8t_llama"
    so8t: dict | None = None


@strict
class So8tPhi3Config(Phi3Config):
    model_type = "so8t_phi3"
    so8t: dict | None = None


@strict
class So8tMistralConfig(MistralConfig):
    model_type = "so8t_mistral"
    so8t: dict | None = None


@strict
class So8tQwen2Config(Qwen2Config):
    model_type = "so8t_qwen2"
    so8t: dict | None = None


# base model_type → (gated config class, the class-name stem of its model classes)
GATED_CONFIGS = {
    "llama": (So8tLlamaConfig, "Llama"),
    "phi3": (So8tPhi3Config, "Phi3"),
    "mistral": (So8tMistralConfig, "Mistral"),
    "qwen2": (So8tQwen2Config, "Qwen2"),
}


def gated_config(base_config, block: dict, head: str):
    """The gated twin of ``base_config`` (a transformers config of a supported architecture) with the
    ``so8t`` block, naming the ``head`` class (``ForCausalLM``, ``ForSequenceClassification``)."""
    base_type = base_config.model_type
    if base_type not in GATED_CONFIGS:
        supported = ", ".join(GATED_CONFIGS)
        raise SO8TError(f"cannot export a {base_type} model: exported gated models exist for {supported}")
    config_class, stem = GATED_CONFIGS[base_type]
    values = {key: value for key, value in base_config.to_dict().items() if key not in ("model_type", "architectures")}
    config = config_class(**values, so8t={"format_version": FORMAT_VERSION, "block_size": BLOCK_SIZE, **block})
    config.architectures = [f"So8t{stem}{head}"]
    return config


def gated_layers(config) -> list[int]:
    """The gated decoder layers an exported config lists; an SO8TError for a block this so8t cannot read."""
    block = getattr(config, SO8T_BLOCK, None)
    if not isinstance(block, dict) or not isinstance(block.get("layers"), list):
        raise SO8TError(f"{type(config).__name__} has no so8t block with the gated layers: not a so8t export")
    if block.get("format_version") != FORMAT_VERSION or block.get("block_size") != BLOCK_SIZE:
        raise SO8TError(f"so8t block format {block.get('format_version')!r} with block size "
                        f"{block.get('block_size')!r}: this so8t reads format {FORMAT_VERSION}, block size {BLOCK_SIZE}")
    return block["layers"]


def gate_tensor_names(layers_path: str, layer: int) -> tuple[str, str]:
    """The checkpoint names of layer ``layer``'s θ and α, under the decoder's layer list ``layers_path``."""
    prefix = f"{layers_path}.{layer}.{GATE_MODULE}"
    return f"{prefix}.theta", f"{prefix}.alpha"


def register() -> None:
    """AutoConfig reads ``so8t_*`` model types (idempotent)."""
    for config_class, _ in GATED_CONFIGS.values():
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
