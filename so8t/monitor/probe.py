"""The device side of one sample: what the kernels already computed, reduced to one flat fp32 tensor.

Order within a sampled optimizer step (HF Trainer callbacks):
1. ``begin()`` (step begin): the gates write activation stats, and two forward hooks accumulate them
   and the logit stats over the step's micro-batches. Without gates (a baseline run), forward hooks on
   the measured decoder layers compute the same statistics of their outputs with ``logit_stats``.
2. ``capture()`` (before the optimizer step): hooks off; gradient norms, parameter and rotation
   statistics of the step.
3. ``vector()`` (step end): everything as one tensor, still on the device. The caller reduces it across
   processes and copies it to the host once.
Nothing here synchronises with the host, and steps that are not sampled run none of it.
"""

import functools
import re
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from so8t_kernels import logit_stats
from so8t_kernels.logit_stats import merge_partials

from ..gates.placement import SO8THandle, find_decoder_layout, unwrap_peft
from ..models.fused_loss import set_fused_loss_stats
from .schema import METRICS

SUM, MEAN, MAX, MIN = "sum", "mean", "max", "min"
OTHER_GROUP = "other"
GATE_FIELDS = tuple(metric.name for metric in METRICS if metric.gates_only)  # NaN in a run without gates


@dataclass(frozen=True)
class Field:
    """A slice of the flat tensor, and how values from several processes combine."""

    name: str
    width: int
    reduction: str
    scalar: bool = False


def trainable_groups(model: nn.Module, handle: SO8THandle | None) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters outside the gates (the LoRA adapters under QLoRA), grouped per decoder
    layer (``L<index>``) plus ``other`` (e.g. a classifier head saved with the adapter)."""
    layers_path = find_decoder_layout(model).path
    layer_of = re.compile(rf"(?:^|\.){re.escape(layers_path)}\.(\d+)\.")
    gate_parameters = {id(handle.theta), id(handle.alpha)} if handle is not None else set()
    groups = defaultdict(list)
    for name, parameter in unwrap_peft(model).named_parameters():
        if parameter.requires_grad and id(parameter) not in gate_parameters:
            match = layer_of.search(name)
            groups[f"L{match.group(1)}" if match else OTHER_GROUP].append(parameter)
    layer_order = sorted((group for group in groups if group != OTHER_GROUP), key=lambda group: int(group[1:]))
    return {group: groups[group] for group in layer_order + [OTHER_GROUP] if group in groups}


class SampleProbe:
    """``handle`` None: a model without gates, whose decoder ``layers`` outputs are measured instead."""

    def __init__(self, model: nn.Module, handle: SO8THandle | None, groups: dict[str, list[nn.Parameter]],
                 layers: list[int] | None = None):
        self.model = model
        self.handle = handle
        self.groups = groups
        layout = find_decoder_layout(model)
        self.backbone = layout.backbone
        self.layers = list(handle.layer_indices) if handle is not None else list(layers)
        self._layer_modules = [layout.layers[index] for index in self.layers]
        self.device = handle.theta.device if handle is not None else _parameter_device(model, groups)
        g, k = len(self.layers), len(groups)
        self.fields = (
            Field("alpha", g, MEAN), Field("gate", g, MEAN),
            Field("ortho_residual_max", g, MAX), Field("ortho_residual_mean", g, MEAN),
            Field("theta_norm_mean", g, MEAN), Field("theta_norm_max", g, MAX),
            Field("rotation_dist_mean", g, MEAN),
            Field("act_sum_squares", g, SUM), Field("act_count", g, SUM),
            Field("act_max_abs", g, MAX), Field("act_nonfinite", g, SUM),
            Field("param_nonfinite", g, SUM),
            Field("grad_theta", g, MEAN), Field("grad_alpha", g, MEAN), Field("grad_lora", k, MEAN),
            Field("grad_nonfinite", 1, SUM, True), Field("lora_param_nonfinite", 1, SUM, True),
            Field("logit_mean", 1, MEAN, True), Field("logit_std", 1, MEAN, True),
            Field("logit_min", 1, MIN, True), Field("logit_max", 1, MAX, True), Field("logit_nonfinite", 1, SUM, True),
            Field("entropy", 1, MEAN, True), Field("top1_accuracy", 1, MEAN, True),
        )
        self._hooks = []
        self._activations = None  # [G, 3]: Σ y², max |y|, non-finite count, over the step's forwards
        self._elements = 0  # gate output elements per layer over the step's forwards (a host int)
        self._logits = []  # (logit_stats, element count) per forward
        self._predictions = []  # ([entropy, top-1 accuracy], scored tokens) per fused-loss forward
        self._captured = None
        # True between the backbone's forward pre-hook and its hook: a layer run outside it is a recompute
        # (a checkpoint that wraps the layer's __call__ re-runs its hooks in backward), not a new forward.
        self._in_backbone = False

    def reductions(self) -> list[str]:
        """Per element of the flat tensor, how processes combine it."""
        return [field.reduction for field in self.fields for _ in range(field.width)]

    # -- 1. forwards of the sampled step --------------------------------------------------------
    def begin(self) -> None:
        self._activations, self._elements, self._logits, self._captured = None, 0, [], None
        self._predictions = []
        set_fused_loss_stats(self.model, True)
        self._in_backbone = False
        self._hooks = [
            self.backbone.register_forward_pre_hook(self._before_backbone),
            self.backbone.register_forward_hook(self._after_backbone),
            self.model.register_forward_hook(self._after_model),
        ]
        if self.handle is not None:
            self.handle.collect_activation_stats = True
        else:
            self._hooks += [module.register_forward_hook(functools.partial(self._after_layer, row))
                            for row, module in enumerate(self._layer_modules)]

    @torch.no_grad()
    def _after_layer(self, row: int, module, args, output) -> None:
        """Without gates: Σ y², max |y| and the non-finite count of one layer's output, from one
        ``logit_stats`` pass (mean, std, min, max over the finite entries, non-finite count); once per
        forward, as the backbone counts the elements once."""
        if not self._in_backbone:
            return
        hidden = (output[0] if isinstance(output, tuple) else output).detach()
        mean, std, low, high, nonfinite = logit_stats(hidden).to(self.device).unbind()
        finite = hidden.numel() - nonfinite
        stats = torch.stack([
            torch.where(finite > 0, finite * (std * std + mean * mean), 0.0),
            torch.nan_to_num(torch.maximum(low.abs(), high.abs()), nan=0.0),
            nonfinite,
        ])
        if self._activations is None:
            self._activations = torch.zeros(len(self.layers), 3, device=self.device)
        self._activations[row, 0::2] += stats[0::2]
        self._activations[row, 1] = torch.maximum(self._activations[row, 1], stats[1])

    def _before_backbone(self, module, args) -> None:
        self._in_backbone = True

    def _after_backbone(self, module, args, output) -> None:
        self._in_backbone = False
        # Every gated layer has written its row by now; the layers' outputs share the backbone's shape.
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        self._elements += hidden.numel()
        if self.handle is None:
            return
        stats = self.handle.activation_stats.detach()
        if self._activations is None:
            self._activations = stats.clone()
        else:
            self._activations[:, 0::2] += stats[:, 0::2]
            torch.maximum(self._activations[:, 1], stats[:, 1], out=self._activations[:, 1])

    def _after_model(self, module, args, output) -> None:
        logits = output.get("logits") if isinstance(output, dict) else getattr(output, "logits", None)
        if logits is not None:
            with torch.no_grad():
                self._logits.append((logit_stats(logits.detach()), logits.numel()))
            return
        # The fused loss made no logits tensor: its op reduced them (so8t.models.fused_loss.FusedCausalLMOutput).
        fused = output.get("logit_stats") if isinstance(output, dict) else None
        if fused is not None:
            self._logits.append((fused[:5], output["num_logits"]))
            self._predictions.append((fused[5:], output["scored_tokens"]))

    def release(self) -> None:
        """Hooks off, activation stats off (also when a sampled step never reached its optimizer step)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        set_fused_loss_stats(self.model, False)
        if self.handle is not None:
            self.handle.collect_activation_stats = False

    # -- 2. before the optimizer step -----------------------------------------------------------
    @torch.no_grad()
    def capture(self) -> None:
        self.release()
        device = self.device
        nan = torch.full((len(self.layers),), float("nan"), device=device)
        if self.handle is None:
            grad_lora = self._group_gradient_norms(device)
            self._captured = {
                **dict.fromkeys(GATE_FIELDS, nan), **self._activation_stats(nan),
                "grad_lora": grad_lora, "grad_nonfinite": (~torch.isfinite(grad_lora)).sum(dtype=torch.float32),
                "lora_param_nonfinite": self._lora_nonfinite(device), **self._logit_summary(device),
            }
            return
        theta, alpha = self.handle.theta, self.handle.alpha
        theta_trainable = theta.requires_grad
        alpha_trainable = alpha.requires_grad and not self.handle.bank.alpha_frozen
        grad_theta = _norm_per_layer(theta.grad, theta) if theta_trainable else nan
        grad_alpha = (alpha.grad.abs() if alpha.grad is not None else torch.zeros_like(alpha)) if alpha_trainable else nan
        grad_lora = self._group_gradient_norms(device)
        trainable_norms = [grad_lora] + [grad_theta] * theta_trainable + [grad_alpha] * alpha_trainable
        grad_nonfinite = (~torch.isfinite(torch.cat(trainable_norms))).sum(dtype=torch.float32)
        param_nonfinite = (~torch.isfinite(theta)).sum(dim=(1, 2)) + (~torch.isfinite(alpha))
        self._captured = {
            "alpha": alpha.detach().clone(), "gate": torch.sigmoid(alpha),  # the optimizer updates α in place
            **self._rotation_stats(nan), **self._activation_stats(nan),
            "param_nonfinite": param_nonfinite.float(),
            "grad_theta": grad_theta, "grad_alpha": grad_alpha, "grad_lora": grad_lora,
            "grad_nonfinite": grad_nonfinite, "lora_param_nonfinite": self._lora_nonfinite(device),
            **self._logit_summary(device),
        }

    def _rotation_stats(self, nan: torch.Tensor) -> dict:
        block_norms = torch.linalg.vector_norm(self.handle.theta, dim=-1)
        stats = {"theta_norm_mean": block_norms.mean(dim=1), "theta_norm_max": block_norms.amax(dim=1)}
        residual, rotation = self.handle.last_residual, self.handle.last_rotation
        no_forward_yet = residual is None
        stats["ortho_residual_max"] = nan if no_forward_yet else residual.amax(dim=1)
        stats["ortho_residual_mean"] = nan if no_forward_yet else residual.mean(dim=1)
        if no_forward_yet:
            stats["rotation_dist_mean"] = nan
        else:
            eye = torch.eye(8, dtype=rotation.dtype, device=rotation.device)
            stats["rotation_dist_mean"] = torch.linalg.vector_norm(rotation - eye, dim=(-2, -1)).mean(dim=1)
        return stats

    def _activation_stats(self, nan: torch.Tensor) -> dict:
        if self._activations is None:
            return {"act_sum_squares": nan, "act_count": nan, "act_max_abs": nan, "act_nonfinite": nan}
        sums = self._activations
        return {
            "act_sum_squares": sums[:, 0], "act_count": torch.full_like(sums[:, 0], float(self._elements)),
            "act_max_abs": sums[:, 1], "act_nonfinite": sums[:, 2],
        }

    def _group_gradient_norms(self, device: torch.device) -> torch.Tensor:
        norms = []
        for parameters in self.groups.values():
            grads = [p.grad for p in parameters if p.grad is not None]
            # torch._foreach_norm: one multi-tensor kernel on CUDA instead of one launch per LoRA tensor.
            norms.append(
                torch.linalg.vector_norm(torch.stack([n.to(device, torch.float32) for n in torch._foreach_norm(grads)]))
                if grads else torch.zeros((), device=device)
            )
        return torch.stack(norms) if norms else torch.zeros(0, device=device)

    def _lora_nonfinite(self, device: torch.device) -> torch.Tensor:
        parameters = [p.detach() for group in self.groups.values() for p in group]
        if not parameters:
            return torch.zeros((), device=device)
        # A tensor's norm is non-finite iff it holds a NaN or inf (or overflows fp32, itself worth an alert).
        norms = torch.stack([n.to(device, torch.float32) for n in torch._foreach_norm(parameters)])
        return (~torch.isfinite(norms)).sum(dtype=torch.float32)

    def _logit_summary(self, device: torch.device) -> dict:
        return self._logit_moments(device) | self._prediction_summary(device)

    def _prediction_summary(self, device: torch.device) -> dict:
        """Entropy and top-1 accuracy over the step's fused-loss forwards, weighted by their scored tokens."""
        nan = torch.full((), float("nan"), device=device)
        if not self._predictions:
            return {"entropy": nan, "top1_accuracy": nan}
        values = torch.stack([v.to(device).double() for v, _ in self._predictions])
        tokens = torch.stack([n.to(device).double() for _, n in self._predictions])
        weighted = torch.where(tokens[:, None] > 0, values * tokens[:, None], 0).sum(dim=0) / tokens.sum()
        return {"entropy": weighted[0], "top1_accuracy": weighted[1]}

    def _logit_moments(self, device: torch.device) -> dict:
        nan = torch.full((), float("nan"), device=device)
        if not self._logits:
            return dict.fromkeys(("logit_mean", "logit_std", "logit_min", "logit_max"), nan) | {
                "logit_nonfinite": nan}
        # Each forward is one partial of logit_stats' own merge (the element count enters as a scalar
        # operand, not a host-to-device copy, which would sync).
        partials = torch.stack([_as_partial(stats.to(device), numel) for stats, numel in self._logits])
        mean, std, low, high, nonfinite = merge_partials(partials).unbind()
        return {"logit_mean": mean, "logit_std": std, "logit_min": low, "logit_max": high, "logit_nonfinite": nonfinite}

    # -- 3. after the optimizer step ------------------------------------------------------------
    def vector(self) -> torch.Tensor:
        if self._captured is None:
            raise RuntimeError("SampleProbe.vector() before capture(): the step's gradients were never read")
        pieces = [self._captured[field.name].reshape(-1).to(self.device, torch.float32) for field in self.fields]
        self._captured = None
        return torch.cat(pieces)

    def to_sample(self, values: np.ndarray) -> dict:
        """The host copy of the (reduced) flat tensor as the metrics of a sample."""
        sample, offset = {}, 0
        for field in self.fields:
            chunk = values[offset:offset + field.width].astype(np.float64)
            offset += field.width
            sample[field.name] = float(chunk[0]) if field.scalar else chunk
        finite = sample.pop("act_count") - sample["act_nonfinite"]
        with np.errstate(divide="ignore", invalid="ignore"):
            sample["act_rms"] = np.sqrt(sample.pop("act_sum_squares") / finite)
        return sample


def _parameter_device(model: nn.Module, groups: dict[str, list[nn.Parameter]]) -> torch.device:
    for parameters in groups.values():
        return parameters[0].device
    return next(model.parameters()).device


def _norm_per_layer(grad: torch.Tensor | None, parameter: torch.Tensor) -> torch.Tensor:
    if grad is None:
        return torch.zeros(parameter.shape[0], device=parameter.device)
    return torch.linalg.vector_norm(grad, dim=tuple(range(1, grad.dim())))


def _as_partial(stats: torch.Tensor, numel) -> torch.Tensor:
    """One forward's ``logit_stats`` (mean, std, min, max, non-finite) over ``numel`` logits as the
    (finite count, mean, M2, min, max, non-finite) partial that ``merge_partials`` reads: a forward with no
    finite logit (NaN moments) counts 0, with min +inf and max -inf, as an empty tile of the kernel."""
    mean, std, low, high, nonfinite = stats.double().unbind()
    finite = numel - nonfinite
    has = finite > 0
    return torch.stack([finite, torch.where(has, mean, 0.0), torch.where(has, finite * std * std, 0.0),
                        torch.where(has, low, float("inf")), torch.where(has, high, float("-inf")), nonfinite])
