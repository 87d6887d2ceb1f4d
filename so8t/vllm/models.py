"""vLLM's Llama, Phi-3, Mistral and Qwen2 with a FrozenGate on each gated decoder layer's output.

vLLM's decoder layers return ``(hidden, residual)`` and leave the residual add to the next layer's fused
add + RMSNorm, so a layer's output in the transformers sense (where training gates it) is
``hidden + residual``. A forward hook replaces it by ``(gate(hidden + residual), 0)``: the next fused add
then yields exactly the gated stream (y + 0 = y), and so does the final norm after a gated last layer.
A hook rather than a decoder-layer subclass: Qwen2's model takes no layer class, and one mechanism
serves all four.

Tensor parallelism: between layers the hidden state is whole on every rank (the row-parallel o_proj and
down_proj all-reduce), so θ and α are plain parameters that every rank loads in full (vLLM's default
weight loader) and R is the same on every rank. Pipeline parallelism: a rank builds only its layers' gates.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.phi3 import Phi3ForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.utils import PPMissingLayer

from ..gates.frozen import GATE_MODULE, FrozenGate
from ..models.gated_config import gated_layers


def _gate_output(layer, args, output):
    hidden, residual = output
    return getattr(layer, GATE_MODULE)(hidden + residual), torch.zeros_like(residual)


class GatedMixin:
    """Before the vLLM model class in the bases: adds the gates once the model is built, and builds
    their rotations once the weights are loaded."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = vllm_config.model_config.hf_config
        for index in gated_layers(config):
            layer = self.model.layers[index]
            if isinstance(layer, PPMissingLayer):  # another pipeline stage's layer
                continue
            layer.add_module(GATE_MODULE, FrozenGate(config.hidden_size))
            layer.register_forward_hook(_gate_output)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = super().load_weights(weights)
        for module in self.modules():
            if isinstance(module, FrozenGate):
                module.freeze()
        return loaded


class So8tLlamaForCausalLM(GatedMixin, LlamaForCausalLM):
    pass


class So8tPhi3ForCausalLM(GatedMixin, Phi3ForCausalLM):
    pass


class So8tMistralForCausalLM(GatedMixin, MistralForCausalLM):
    pass


class So8tQwen2ForCausalLM(GatedMixin, Qwen2ForCausalLM):
    pass
