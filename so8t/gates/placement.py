"""Attaching SO(8) gates to the outputs of a decoder's layers, and detaching them again.

Each gated layer ℓ gets a forward hook that replaces its output hidden state h by
h + σ(α_ℓ)(R_ℓ h − h) per 8-wide chunk (R_ℓ = exp(A(θ)) ∈ SO(8)), inside the forward pass, so everything
downstream (later layers, the final norm, the logits) sees the rotated residual stream.
The module that owns the layer list (the "backbone", e.g. ``Phi3Model``) gets a forward pre-hook
that builds every gated layer's rotations with one ``so8_exp`` call per forward.

transformers ≥ 5.20 checkpoints a decoder layer's ``forward``, not its ``__call__``, so the gate hooks run
outside the checkpointed region: recomputation never sees them, and θ gets its gradient once. Older
versions (4.x, 5.19: what vLLM pins) checkpoint ``__call__``, hooks included: the backward pass then
recomputes the gate, which must use the rotations of the forward it recomputes (see _gate_layer_output).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from so8t_kernels import so8_rotate

from ..errors import SO8TError
from .bank import BLOCK_SIZE, NUM_ACTIVATION_STATS, SO8TGateBank
from .config import ALL_INTERMEDIATE, SO8TConfig

BANK_ATTRIBUTE = "so8t_gates"

# Where decoder-only models keep their layers, relative to the model under any peft wrapper:
# Phi-3, Llama, Mistral, Qwen2, Gemma (model.layers); GPT-2 (transformer.h); GPT-NeoX (gpt_neox.layers);
# OPT-style (model.decoder.layers); multimodal wrappers (model.language_model.layers).
KNOWN_LAYER_PATHS = (
    "model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.decoder.layers",
    "model.language_model.layers",
    "language_model.model.layers",
    "layers",
    "h",
)


@dataclass
class DecoderLayout:
    backbone: nn.Module  # owns the layer list; its forward runs once per model forward
    layers: nn.ModuleList
    path: str
    num_layers: int
    hidden_size: int


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (or the model itself)."""
    get_base_model = getattr(type(model), "get_base_model", None)
    return model.get_base_model() if callable(get_base_model) else model


def find_decoder_layout(model: nn.Module) -> DecoderLayout:
    """The decoder layers of an HF decoder-only model, its layer count and hidden size from its config."""
    base = unwrap_peft(model)
    config = getattr(base, "config", None)
    if config is None:
        raise SO8TError(f"{type(base).__name__} has no `config`: so8t gates Hugging Face decoder models")
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    num_layers = getattr(text_config, "num_hidden_layers", None)
    hidden_size = getattr(text_config, "hidden_size", None)
    if not isinstance(num_layers, int) or not isinstance(hidden_size, int):
        raise SO8TError(
            f"cannot read the layer count and hidden size from {type(config).__name__} "
            "(expected `num_hidden_layers` and `hidden_size`)"
        )
    if hidden_size % BLOCK_SIZE:
        raise SO8TError(
            f"hidden size {hidden_size} is not a multiple of 8: SO(8) gates rotate 8-wide chunks of the hidden state"
        )
    path = _find_layer_path(base, num_layers)
    parent_path, _, _ = path.rpartition(".")
    return DecoderLayout(
        backbone=base.get_submodule(parent_path),
        layers=base.get_submodule(path),
        path=path,
        num_layers=num_layers,
        hidden_size=hidden_size,
    )


def _find_layer_path(base: nn.Module, num_layers: int) -> str:
    lists = {name: module for name, module in base.named_modules() if isinstance(module, nn.ModuleList)}
    for path in KNOWN_LAYER_PATHS:
        if path in lists and len(lists[path]) == num_layers:
            return path
    matching = [name for name, module in lists.items() if len(module) == num_layers]
    if len(matching) == 1:
        return matching[0]
    found = ", ".join(f"{name} ({len(module)})" for name, module in lists.items()) or "no module lists"
    raise SO8TError(
        f"cannot find the decoder layers of {type(base).__name__}: expected one module list of "
        f"{num_layers} layers (config.num_hidden_layers), found {found}"
    )


def resolve_layer_indices(layers: str | list[int], num_layers: int) -> list[int]:
    """The sorted 0-based indices to gate: 1 … L−2 for ``all_intermediate``, else the given ones."""
    if layers == ALL_INTERMEDIATE:
        if num_layers < 3:
            raise SO8TError(f"the model has {num_layers} decoder layers: no intermediate layer (1 … L−2) to gate")
        return list(range(1, num_layers - 1))
    outside = [i for i in layers if not 0 <= i < num_layers]
    if outside:
        raise SO8TError(
            f"layer index {outside[0]} is out of range: the model has {num_layers} decoder layers (0 … {num_layers - 1})"
        )
    return sorted(layers)


class SO8THandle:
    """The gates attached to one model: their parameters, what the last forward measured, and ``detach()``.

    Read by the monitor: ``last_rotation`` ``[G, hidden/8, 8, 8]`` and ``last_residual`` ``[G, hidden/8]``
    (detached device tensors from the latest forward's so8_exp call) and, on forwards where
    ``collect_activation_stats`` is True, ``activation_stats`` ``[G, 3]``.
    """

    def __init__(self, model: nn.Module, config: SO8TConfig, layout: DecoderLayout, layer_indices: list[int]):
        self.model = model
        self.config = config
        self.layer_indices = layer_indices
        self.num_layers = layout.num_layers
        self.hidden_size = layout.hidden_size
        self.collect_activation_stats = False
        self.last_rotation: torch.Tensor | None = None
        self.last_residual: torch.Tensor | None = None
        self._forward_gates: tuple[torch.Tensor, torch.Tensor] | None = None  # (R, α) of the running forward
        self._last_gates: tuple[torch.Tensor, torch.Tensor] | None = None  # kept for the backward's recomputation
        self._grad_enabled_in_forward = False
        self._reentrant_checkpointing = False  # a gated layer ran without autograd inside a forward with it

        first_layer_param = next(layout.layers[layer_indices[0]].parameters(), None)
        self.bank = SO8TGateBank(
            len(layer_indices), layout.hidden_size, config.alpha_init, config.theta_init_std,
            device=first_layer_param.device if first_layer_param is not None else None,
        )
        self.bank.handle = weakref.ref(self)  # for find_so8t_handle; the hooks below keep self alive
        self._backbone = layout.backbone
        self._backbone.add_module(BANK_ATTRIBUTE, self.bank)
        self._hooks = [
            self._backbone.register_forward_pre_hook(self._begin_forward),
            self._backbone.register_forward_hook(self._end_forward),
        ]
        # prepend: anything else observing a layer's output (transformers' hidden-state capture) sees it gated.
        for gate_index, layer_index in enumerate(layer_indices):
            hook = partial(self._gate_layer_output, gate_index)
            self._hooks.append(layout.layers[layer_index].register_forward_hook(hook, prepend=True))

    @property
    def theta(self) -> nn.Parameter:
        return self.bank.theta

    @property
    def alpha(self) -> nn.Parameter:
        return self.bank.alpha

    @property
    def activation_stats(self) -> torch.Tensor:
        return self.bank.activation_stats

    def detach(self) -> None:
        """Removes the hooks and the parameter bank: the model is as it was before ``attach_so8t``."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if getattr(self._backbone, BANK_ATTRIBUTE, None) is self.bank:
            delattr(self._backbone, BANK_ATTRIBUTE)
        self._forward_gates = self._last_gates = None

    def _gates(self) -> tuple[torch.Tensor, torch.Tensor]:
        rotations, residual = self.bank.rotations()
        self.last_rotation = rotations.detach()
        self.last_residual = residual.detach()
        return rotations, self.bank.gate_logits()

    def _begin_forward(self, module, args) -> None:
        self._forward_gates = self._last_gates = self._gates()
        self._grad_enabled_in_forward = torch.is_grad_enabled()
        self._reentrant_checkpointing = False

    def _end_forward(self, module, args, output) -> None:
        self._forward_gates = None

    def _gates_for_layer_call(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._forward_gates is not None:
            # Inside the backbone's forward. A hook without autograd there runs inside a reentrant
            # checkpoint (older transformers checkpoint the layer's __call__): its backward recomputes.
            if self._grad_enabled_in_forward and not torch.is_grad_enabled():
                self._reentrant_checkpointing = True
            return self._forward_gates
        recomputing = torch._C._current_graph_task_id() != -1 and self._last_gates is not None
        if recomputing and not self._reentrant_checkpointing:
            # Non-reentrant checkpointing replays the layer and checks that it saves the same tensors:
            # the rotations the forward used, not new ones (whose gradient would never reach θ anyway).
            return self._last_gates
        # A layer called on its own, or a reentrant checkpoint's replay (its own backward pass needs its
        # own path to θ): the rotations built for this call.
        return self._gates()

    def _gate_layer_output(self, gate_index: int, module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        rotations, alphas = self._gates_for_layer_call()
        # .to() is a no-op unless the model is split over devices (device_map), where it moves 8 KB per layer.
        rotation = rotations[gate_index].to(hidden.device)
        alpha = alphas[gate_index].to(hidden.device)
        if self.collect_activation_stats:
            # The kernel writes a scratch row on the layer's device (under device_map the bank's buffer
            # may live on another one); 12 bytes copied per layer, on sampled steps only.
            stats = torch.empty(NUM_ACTIVATION_STATS, dtype=torch.float32, device=hidden.device)
            gated = so8_rotate(hidden, rotation, alpha, stats=stats)
            self.bank.activation_stats[gate_index].copy_(stats)
        else:
            gated = so8_rotate(hidden, rotation, alpha)
        return (gated, *output[1:]) if isinstance(output, tuple) else gated


def attach_so8t(model: nn.Module, config: SO8TConfig | None = None) -> SO8THandle:
    """Adds SO(8) gates to the outputs of ``model``'s decoder layers (1 … L−2 by default).

    Works on transformers models, through peft wrappers, and on 4-bit bitsandbytes models; runs no
    forward. Attach after ``get_peft_model``: peft freezes every parameter that is not its own.
    """
    config = config or SO8TConfig()
    if find_so8t_handle(model) is not None:
        raise SO8TError("the model already has SO8T gates: detach them first")
    layout = find_decoder_layout(model)
    layer_indices = resolve_layer_indices(config.layers, layout.num_layers)
    return SO8THandle(model, config, layout, layer_indices)


def find_so8t_handle(model: nn.Module) -> SO8THandle | None:
    """The handle of the gates attached to ``model`` (also through peft, DDP or other wrappers), or None."""
    for module in model.modules():
        if isinstance(module, SO8TGateBank):
            return module.handle()
    return None
