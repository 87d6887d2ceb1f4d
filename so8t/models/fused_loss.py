"""Causal-LM training loss without the logits tensor: the backbone's last hidden state and the LM head's
weight go to ``so8t_kernels.linear_cross_entropy`` instead of materialising [batch, seq, vocab] logits.

``apply_fused_loss(model)`` replaces the forward of the causal LM (under a peft wrapper too) by one that,
in training mode and with ``labels``, runs the backbone and the fused loss, with the labels shifted by
one as the model's own loss does (token t predicts token t + 1; the last position predicts nothing).
Everything else (eval mode, no labels, generation) runs the model's own forward. The loss equals the
model's: "mean" over the predicted tokens, or the sum over ``num_items_in_batch`` when the Trainer
passes it (gradient accumulation). ``revert_fused_loss`` undoes it.

Handled exactly: a plain ``nn.Linear`` head, tied to the input embeddings or not, with or without bias,
and a padded vocabulary (Phi-3's 32,064 head rows for a 32,011-token tokenizer: the padded rows are in
the softmax of both losses). Anything whose logits are not ``head(last hidden state)`` (Gemma-2/3
final logit soft-capping, Cohere's logit scale, Granite's logit scaling, a mixture of experts' router
loss, a LoRA-wrapped or quantised head) or an architecture not known to be plain keeps the model's own
loss: ``apply_fused_loss`` then returns the reason, and ``so8t train`` prints it in one line.

On steps the monitor samples, ``set_fused_loss_stats(model, True)`` makes the op also reduce the
logit statistics, entropy and top-1 accuracy (no extra pass); the output carries them as
``logit_stats`` [7], ``num_logits`` and ``scored_tokens`` (see ``FusedCausalLMOutput``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from so8t_kernels import linear_cross_entropy
from so8t_kernels.linear_cross_entropy import NUM_STATS

from ..gates.placement import find_decoder_layout, unwrap_peft

IGNORE_INDEX = -100
STATE_ATTRIBUTE = "so8t_fused_loss"
# Architectures whose causal-LM forward is exactly head(backbone(...)) followed by ForCausalLMLoss.
PLAIN_ARCHITECTURES = frozenset({"phi3", "phi", "llama", "mistral", "qwen2", "qwen3", "gemma", "gpt_neox", "gpt2"})
# Config attributes that put something between the head and the softmax, with their neutral value.
LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": None, "logits_scaling": 1.0}


@dataclass
class FusedCausalLMOutput(CausalLMOutputWithPast):
    """A causal LM's output from the fused loss: ``logits`` is None. On sampled monitor steps:
    ``logit_stats`` [mean, std, min, max, non-finite count, mean entropy, top-1 accuracy] (fp32),
    ``num_logits`` (tokens × vocabulary, a host int) and ``scored_tokens`` (non-ignored tokens, a tensor)."""

    logit_stats: torch.FloatTensor | None = None
    num_logits: int | None = None
    scored_tokens: torch.Tensor | None = None


class FusedLossState:
    """What ``apply_fused_loss`` keeps on the causal LM (as ``so8t_fused_loss``)."""

    def __init__(self, original_forward, backbone: nn.Module, head: nn.Linear):
        self.original_forward = original_forward
        self.backbone = backbone
        self.head = head
        self.collect_stats = False


def causal_lm_loss(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor, num_items_in_batch=None,
                   stats: torch.Tensor | None = None, shift_labels: torch.Tensor | None = None) -> torch.Tensor:
    """The model's own causal-LM loss (``ForCausalLMLoss``) of ``head(hidden)``, computed by the fused op.

    hidden [..., T, H] (the backbone's last hidden state), labels [..., T] (−100 ignored); the labels
    are shifted left by one unless ``shift_labels`` are given. Mean over the predicted tokens, or the
    sum divided by ``num_items_in_batch`` when given. ``stats``: see ``linear_cross_entropy``.
    """
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    weight = head.weight
    rows = hidden.reshape(-1, hidden.shape[-1]).to(weight.dtype)
    targets = shift_labels.reshape(-1).to(rows.device)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = linear_cross_entropy(rows, weight, targets, bias=head.bias, ignore_index=IGNORE_INDEX,
                                reduction=reduction, stats=stats)
    if num_items_in_batch is not None:
        loss = loss / (num_items_in_batch.to(loss.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch)
    return loss


def unsupported_reason(model: nn.Module) -> str | None:
    """None if the fused loss computes exactly the loss of ``model`` (a causal LM, peft-wrapped or not),
    else why not, in a few words."""
    causal_lm = unwrap_peft(model)
    config = causal_lm.config
    for name, neutral in LOGIT_TRANSFORMS.items():
        value = getattr(config, name, neutral)
        if value != neutral:
            return f"its logits go through {name}={value}, not only the LM head"
    if getattr(config, "output_router_logits", False):
        return "its loss adds a mixture-of-experts router loss"
    if config.model_type not in PLAIN_ARCHITECTURES:
        return f"architecture {config.model_type!r} is not one known to compute logits as head(last hidden state)"
    head = causal_lm.get_output_embeddings()
    if type(head) is not nn.Linear:
        kind = f"{type(head).__module__}.{type(head).__qualname__}"
        return f"its LM head is a {kind} (LoRA-wrapped or quantised?), not a plain torch.nn.Linear"
    return None


def _fused_forward(causal_lm: nn.Module, state: FusedLossState):
    @functools.wraps(state.original_forward)  # the Trainer reads the forward's signature
    def forward(*args, labels=None, **kwargs):
        if labels is None or args or not causal_lm.training:
            return state.original_forward(*args, labels=labels, **kwargs)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        shift_labels = kwargs.pop("shift_labels", None)
        kwargs.pop("logits_to_keep", None)
        kwargs.pop("return_dict", None)
        kwargs["use_cache"] = False
        outputs = state.backbone(**kwargs)
        hidden = outputs[0]
        stats = torch.empty(NUM_STATS, dtype=torch.float32, device=hidden.device) if state.collect_stats else None
        loss = causal_lm_loss(hidden, state.head, labels, num_items_in_batch, stats, shift_labels)
        if stats is None:
            return FusedCausalLMOutput(loss=loss)
        targets = shift_labels if shift_labels is not None else labels[..., 1:]
        return FusedCausalLMOutput(
            loss=loss, logit_stats=stats, num_logits=hidden.shape[:-1].numel() * state.head.weight.shape[0],
            scored_tokens=(targets != IGNORE_INDEX).sum(),
        )

    return forward


def apply_fused_loss(model: nn.Module) -> str | None:
    """Makes ``model`` (a causal LM, peft-wrapped or not) train with the fused loss. Returns None when
    applied, else the reason it was not (the model keeps its own loss)."""
    why = unsupported_reason(model)
    if why is not None:
        return why
    causal_lm = unwrap_peft(model)
    if hasattr(causal_lm, STATE_ATTRIBUTE):
        return None
    state = FusedLossState(causal_lm.forward, find_decoder_layout(causal_lm).backbone, causal_lm.get_output_embeddings())
    causal_lm.__dict__[STATE_ATTRIBUTE] = state
    causal_lm.forward = _fused_forward(causal_lm, state)
    return None


def revert_fused_loss(model: nn.Module) -> None:
    causal_lm = unwrap_peft(model)
    if causal_lm.__dict__.pop(STATE_ATTRIBUTE, None) is not None:
        del causal_lm.forward  # the class's forward again


def fused_loss_state(model: nn.Module) -> FusedLossState | None:
    return unwrap_peft(model).__dict__.get(STATE_ATTRIBUTE)


def set_fused_loss_stats(model: nn.Module, collect: bool) -> None:
    """Whether the fused loss also reduces the logit statistics (the monitor's sampled steps)."""
    state = fused_loss_state(model)
    if state is not None:
        state.collect_stats = collect
