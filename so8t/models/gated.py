"""Exported gated models in transformers: ``So8tLlamaForCausalLM`` … (and ``…ForSequenceClassification``
for exported safety judges), the base architecture's classes with a FrozenGate on each gated decoder
layer's output, exactly where ``so8t.gates.placement`` puts a training gate.

``register()`` adds them to AutoModelForCausalLM and AutoModelForSequenceClassification; ``import so8t``
arranges that it runs when transformers' Auto model classes are first imported, so
``AutoModelForCausalLM.from_pretrained(EXPORT)`` returns the gated model without trust_remote_code.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaModel,
    MistralForCausalLM,
    MistralForSequenceClassification,
    MistralModel,
    Phi3ForCausalLM,
    Phi3ForSequenceClassification,
    Phi3Model,
    Qwen2ForCausalLM,
    Qwen2ForSequenceClassification,
    Qwen2Model,
)
from transformers import initialization as init

from ..errors import SO8TError
from ..gates.frozen import GATE_MODULE, FrozenGate
from . import gated_config
from .gated_config import So8tLlamaConfig, So8tMistralConfig, So8tPhi3Config, So8tQwen2Config, gated_layers


def _gate_output(layer, args, output):
    hidden = output[0] if isinstance(output, tuple) else output
    gated = getattr(layer, GATE_MODULE)(hidden)
    return (gated, *output[1:]) if isinstance(output, tuple) else gated


class GatedMixin:
    """Before the base class in the bases: adds the gates after the base model is built, builds their
    rotations once the weights are loaded, and refuses a checkpoint without them."""

    _keep_in_fp32_modules = [GATE_MODULE]  # θ and α stay fp32 in bf16/fp16 exports, as trained

    def __init__(self, config):
        super().__init__(config)
        for index in gated_layers(config):
            layer = self.model.layers[index]
            layer.add_module(GATE_MODULE, FrozenGate(config.hidden_size))
            # prepend: transformers' hidden-state capture hooks see the gated output, as in training.
            layer.register_forward_hook(_gate_output, prepend=True)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, FrozenGate):  # loaded from the checkpoint; these values only for from_config
            init.zeros_(module.theta)
            init.zeros_(module.alpha)
            init.copy_(module.rotation, torch.eye(module.rotation.shape[-1]).expand_as(module.rotation))
        else:
            super()._init_weights(module)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        missing = sorted(name for name in info["missing_keys"] if f".{GATE_MODULE}." in name)
        if missing:  # loading on would serve the base model with gates at their initial values, silently
            raise SO8TError(f"{args[0] if args else 'the checkpoint'} lacks the gate tensors of its config's so8t "
                            f"block: {', '.join(missing[:4])}{' …' if len(missing) > 4 else ''}")
        model.freeze_gates()
        return (model, info) if wants_info else model

    def freeze_gates(self) -> None:
        """Builds every gate's R from its θ (after the weights changed)."""
        for module in self.modules():
            if isinstance(module, FrozenGate):
                module.freeze()


class So8tLlamaForCausalLM(GatedMixin, LlamaForCausalLM):
    config_class = So8tLlamaConfig


class So8tPhi3ForCausalLM(GatedMixin, Phi3ForCausalLM):
    config_class = So8tPhi3Config


class So8tMistralForCausalLM(GatedMixin, MistralForCausalLM):
    config_class = So8tMistralConfig


class So8tQwen2ForCausalLM(GatedMixin, Qwen2ForCausalLM):
    config_class = So8tQwen2Config


# The backbones, ungated: the sequence classifiers build theirs through AutoModel.from_config(config).
class So8tLlamaModel(LlamaModel):
    config_class = So8tLlamaConfig


class So8tPhi3Model(Phi3Model):
    config_class = So8tPhi3Config


class So8tMistralModel(MistralModel):
    config_class = So8tMistralConfig


class So8tQwen2Model(Qwen2Model):
    config_class = So8tQwen2Config


class So8tLlamaForSequenceClassification(GatedMixin, LlamaForSequenceClassification):
    config_class = So8tLlamaConfig


class So8tPhi3ForSequenceClassification(GatedMixin, Phi3ForSequenceClassification):
    config_class = So8tPhi3Config


class So8tMistralForSequenceClassification(GatedMixin, MistralForSequenceClassification):
    config_class = So8tMistralConfig


class So8tQwen2ForSequenceClassification(GatedMixin, Qwen2ForSequenceClassification):
    config_class = So8tQwen2Config


_AUTO_CLASSES = {
    AutoModel: (So8tLlamaModel, So8tPhi3Model, So8tMistralModel, So8tQwen2Model),
    AutoModelForCausalLM: (So8tLlamaForCausalLM, So8tPhi3ForCausalLM, So8tMistralForCausalLM, So8tQwen2ForCausalLM),
    AutoModelForSequenceClassification: (So8tLlamaForSequenceClassification, So8tPhi3ForSequenceClassification,
                                         So8tMistralForSequenceClassification, So8tQwen2ForSequenceClassification),
}


def register() -> None:
    """The Auto classes load exported gated models (idempotent); AutoConfig reads their configs."""
    gated_config.register()
    for auto_class, model_classes in _AUTO_CLASSES.items():
        for model_class in model_classes:
            auto_class.register(model_class.config_class, model_class, exist_ok=True)

