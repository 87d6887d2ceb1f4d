"""Shared pieces of the op tests: the backends to run, the float64 oracle comparison, poisoned outputs."""

import os

import pytest
import torch

from so8t_kernels import _backend

DEVICE = torch.device(os.environ.get("SO8T_TEST_DEVICE", "cpu"))
USABLE_BACKENDS = [b for b in _backend.BACKENDS if _backend.why_unusable(b, DEVICE) is None]
LOW_PRECISION = (torch.bfloat16, torch.float16)


@pytest.fixture(params=USABLE_BACKENDS)
def backend(request, monkeypatch):
    """Runs the test once per backend usable on DEVICE, with SO8T_BACKEND set to it."""
    monkeypatch.setenv(_backend.ENV_VAR, request.param)
    return request.param


def with_backend(name: str, fn, *args, **kwargs):
    """fn(*args) with SO8T_BACKEND=name for the duration of the call."""
    previous = os.environ.get(_backend.ENV_VAR)
    os.environ[_backend.ENV_VAR] = name
    try:
        return fn(*args, **kwargs)
    finally:
        if previous is None:
            del os.environ[_backend.ENV_VAR]
        else:
            os.environ[_backend.ENV_VAR] = previous


def relative_error(actual: torch.Tensor, oracle: torch.Tensor, scale: float | None = None) -> float:
    """max |actual − oracle| / scale over finite oracle entries, in float64; scale defaults to max |oracle|."""
    actual, oracle = actual.detach().double().cpu(), oracle.detach().double().cpu()
    finite = torch.isfinite(oracle)
    if not finite.any():
        return 0.0
    if scale is None:
        scale = oracle[finite].abs().max().clamp_min(1e-30).item()
    return ((actual - oracle)[finite].abs().max() / scale).item()


def assert_matches_oracle(
    actual, oracle, reference, dtype: torch.dtype, what: str, absolute_bound: float, scale: float | None = None
):
    """The accuracy rule for every backend: its error against the float64 oracle is at most twice the PyTorch
    reference's error in the same dtype, and the reference itself is within ``absolute_bound``.

    Both errors are relative to max |oracle|, or to ``scale`` for a sum that cancels (there the honest
    yardstick is Σ|terms|, the sum's condition, not the small result). The floor of one unit roundoff of ``dtype`` (eps) covers
    the output's final rounding: half an ulp with round-to-nearest (CPU, GPU), up to one ulp where the
    Triton interpreter truncates fp32 → bf16 (triton 3.7.1 interpreter.py, cast_impl passes no rounding
    mode), even where this sample's reference error happens to stay below half an ulp.
    """
    assert actual.shape == oracle.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(oracle.shape)}"
    reference_error = relative_error(reference, oracle, scale)
    assert reference_error <= absolute_bound, f"{what}: reference error {reference_error:.3e} > {absolute_bound:.1e}"
    eps = torch.finfo(dtype).eps
    error = relative_error(actual, oracle, scale)
    bound = 2 * max(reference_error, eps)
    assert error <= bound, f"{what}: error {error:.3e} > 2 × max(reference {reference_error:.3e}, eps {eps:.1e})"


def assert_same_nonfinite(actual: torch.Tensor, expected: torch.Tensor, what: str):
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    assert torch.equal(torch.isnan(actual), torch.isnan(expected)), f"{what}: NaN positions differ"
    assert torch.equal(torch.isposinf(actual), torch.isposinf(expected)), f"{what}: +inf positions differ"
    assert torch.equal(torch.isneginf(actual), torch.isneginf(expected)), f"{what}: -inf positions differ"


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """torch.empty/empty_like return NaN-filled (float) or extreme-valued (int) tensors, so any output
    element a kernel forgets to write shows up; yields the list of allocation shapes made."""
    made = []
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(tensor):
        made.append(tuple(tensor.shape))
        return tensor.fill_(float("nan") if tensor.is_floating_point() else torch.iinfo(tensor.dtype).max)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
    return made


def rotation_with_norm(num_blocks: int, norm: float, generator: torch.Generator) -> torch.Tensor:
    """θ [num_blocks, 28] in float64 whose skew matrices have ‖A‖_F = norm (‖A‖_F = √2 ‖θ‖₂)."""
    theta = torch.randn(num_blocks, 28, dtype=torch.float64, generator=generator)
    return theta / theta.norm(dim=-1, keepdim=True) * (norm / 2**0.5)
