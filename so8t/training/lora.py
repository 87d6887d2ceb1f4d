"""LoRA adapters for ``so8t train``: which modules get them, and adding them in the order peft requires."""

from __future__ import annotations

from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

from ..errors import SO8TError
from ..models.bnb_guard import keep_4bit_weights_trainable
from .options import LORA_TARGETS, TrainOptions


def lora_targets(options: TrainOptions, model) -> list[str] | str:
    """``--lora-targets``, each checked against the model; by default the architecture's (LORA_TARGETS)."""
    if not options.lora_targets:
        return LORA_TARGETS.get(getattr(model.config, "model_type", ""), "all-linear")
    # peft only fails when no name matches at all; a typo next to a valid name would go unnoticed.
    module_names = {name.rpartition(".")[2] for name, _ in model.named_modules()}
    unknown = [target for target in options.lora_targets if target not in module_names]
    if unknown:
        raise SO8TError(f"--lora-targets {','.join(unknown)}: no module of that name in the model")
    return options.lora_targets


def add_lora(options: TrainOptions, model, task_type: str = "CAUSAL_LM"):
    """4-bit preparation, gradient checkpointing and LoRA; every other parameter is frozen (a
    sequence-classification head, task_type ``SEQ_CLS``, is trained in full)."""
    # Non-reentrant checkpointing needs no input-grad hook and is the transformers 5 default.
    checkpointing_kwargs = {"use_reentrant": False}
    if options.load_in_4bit:
        # Checkpointing is enabled below, not by peft, which calls the name transformers 5.20 deprecated.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        # An eval or generation on CPU would otherwise repack the 4-bit weights and zero LoRA gradients.
        keep_4bit_weights_trainable(model)
    if options.gradient_checkpointing:
        # transformers 5.20 renamed gradient_checkpointing_enable (the old name warns there); vLLM's pin is older.
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable(checkpointing_kwargs)
    lora = LoraConfig(r=options.lora_r, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                      target_modules=lora_targets(options, model), task_type=task_type)
    try:
        return get_peft_model(model, lora)
    except ValueError as error:
        raise SO8TError(f"cannot add LoRA adapters: {error}") from None
