"""so8t.vllm: vLLM serves what ``so8t export`` writes. The ``vllm.general_plugins`` entry point (setup.py)
makes vLLM call ``register()`` in each of its processes (front end, engine core, workers), so
``vllm.LLM(EXPORT)`` and vLLM's OpenAI server need nothing but so8t installed beside vLLM. Only this
package imports vllm.
"""

from __future__ import annotations

# The gated architectures config.json names (so8t.models.gated_config); their classes are imported lazily,
# by the process that builds the model ("module:Class", vLLM's registry format).
ARCHITECTURES = ("So8tLlamaForCausalLM", "So8tPhi3ForCausalLM", "So8tMistralForCausalLM", "So8tQwen2ForCausalLM")


def register() -> None:
    """The gated configs with transformers' AutoConfig (vLLM reads config.json through it) and the gated
    architectures with vLLM's model registry. Idempotent and cheap: vLLM calls it in every process."""
    from vllm import ModelRegistry

    from ..models import gated_config

    gated_config.register()
    supported = set(ModelRegistry.get_supported_archs())
    for architecture in ARCHITECTURES:
        if architecture not in supported:
            ModelRegistry.register_model(architecture, f"so8t.vllm.models:{architecture}")
