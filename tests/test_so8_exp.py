"""so8_exp: values, residual and gradients on every usable backend against float64 oracles."""

import numpy as np
import pytest
import scipy.linalg
import torch
from ops_helpers import (
    DEVICE,
    LOW_PRECISION,
    assert_matches_oracle,
    assert_same_nonfinite,
    backend,  # noqa: F401  (fixture)
    poisoned_allocations,  # noqa: F401  (fixture)
    rotation_with_norm,
    with_backend,
)

from so8t_kernels import so8_exp
from so8t_kernels.so8_exp import PAIRS, exp_reference, skew_from_theta

NORMS = [0.0, 1e-4, 0.3, 1.0, 2.0, 3.0, 10.0, 30.0, 50.0]


def scipy_expm(theta: torch.Tensor) -> torch.Tensor:
    """Independent oracle: scipy's Padé expm on the skew matrices, float64."""
    skew = skew_from_theta(theta.detach().double().cpu()).reshape(-1, 8, 8).numpy()
    rotations = np.stack([scipy.linalg.expm(a) for a in skew]) if len(skew) else np.zeros((0, 8, 8))
    return torch.from_numpy(rotations).reshape(*theta.shape[:-1], 8, 8)


def test_parameter_order_is_row_major_upper_triangle():
    theta = torch.arange(1.0, 29.0)
    skew = skew_from_theta(theta)
    assert PAIRS[:3] == [(0, 1), (0, 2), (0, 3)] and PAIRS[-1] == (6, 7)
    assert skew[0, 1] == 1 and skew[0, 7] == 7 and skew[1, 2] == 8 and skew[6, 7] == 28
    assert torch.equal(skew, -skew.T)
    assert torch.all(skew.diagonal() == 0)


@pytest.mark.parametrize("norm", NORMS)
def test_fp32_rotation_accuracy_and_residual_at_every_norm(backend, norm):
    generator = torch.Generator().manual_seed(int(norm * 1000) + 1)
    theta64 = rotation_with_norm(48, norm, generator)
    oracle = scipy_expm(theta64)
    rotation, residual = so8_exp(theta64.float().to(DEVICE))
    assert rotation.dtype == torch.float32 and residual.dtype == torch.float32
    assert rotation.shape == (48, 8, 8) and residual.shape == (48,)
    relative = (rotation.double().cpu() - oracle).norm(dim=(-2, -1)) / oracle.norm(dim=(-2, -1))
    # On a GPU, ‖A‖_F goes through sqrt.approx and lg2.approx: that can move s by one only where
    # ‖A‖_F / 2^s sits on the boundary 2, where either s meets this bound (the Taylor error at
    # ‖X‖_F = 2(1 + ε) is still ~1e-9). The scale 2^−s is built from bits and 1/k is div.rn, so
    # they are exact as on the CPU; the FMA-contracted products only remove roundings.
    assert relative.max() <= 1e-5, f"‖R − R_ref‖/‖R_ref‖ = {relative.max():.2e} at ‖A‖_F = {norm}"
    assert residual.max() <= 1e-5, f"residual {residual.max():.2e} at ‖A‖_F = {norm}"
    # The residual is measured from the R returned, in fp32, not assumed. On a GPU its final sqrt is
    # sqrt.approx (≤ 2 ulp of a ~1e-6 value): far inside the 2e-7 absolute tolerance.
    eye = torch.eye(8, device=DEVICE)
    measured = torch.linalg.matrix_norm(rotation.mT @ rotation - eye)
    assert torch.allclose(residual, measured, atol=2e-7)


def test_reference_float64_matches_scipy_and_is_orthogonal():
    generator = torch.Generator().manual_seed(0)
    theta = torch.cat([rotation_with_norm(16, norm, generator) for norm in NORMS])
    rotation, residual = exp_reference(theta)
    assert rotation.dtype == torch.float64
    oracle = scipy_expm(theta)
    assert (rotation - oracle).abs().max() <= 1e-12
    assert residual.max() <= 1e-13
    assert torch.allclose(torch.linalg.det(rotation), torch.ones(len(theta), dtype=torch.float64))


@pytest.mark.parametrize("batch", [(), (1,), (7,), (3, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_values_and_gradients_against_float64(backend, batch, dtype):
    generator = torch.Generator().manual_seed(len(batch) * 10 + int(torch.finfo(dtype).bits))
    theta64 = torch.randn(*batch, 28, dtype=torch.float64, generator=generator) * 0.8
    theta = theta64.to(dtype)
    grad_rotation = torch.randn(*batch, 8, 8, dtype=torch.float64, generator=generator)
    # Oracle: the same (dtype-rounded) θ in float64, gradient through torch.linalg.matrix_exp.
    theta_oracle = theta.double().requires_grad_()
    oracle = torch.linalg.matrix_exp(skew_from_theta(theta_oracle))
    (oracle_grad,) = torch.autograd.grad((oracle * grad_rotation).sum(), theta_oracle)

    def run():
        leaf = theta.to(DEVICE).requires_grad_()
        rotation, _ = so8_exp(leaf)
        (grad,) = torch.autograd.grad((rotation * grad_rotation.float().to(DEVICE)).sum(), leaf)
        return rotation, grad

    rotation, grad = run()
    reference_rotation, reference_grad = with_backend("torch", run)
    assert rotation.dtype == torch.float32 and grad.dtype == dtype and grad.shape == theta.shape
    assert_matches_oracle(rotation, oracle, reference_rotation, torch.float32, "R", absolute_bound=1e-6)
    # The gradient comes back in θ's dtype: its final rounding sets the floor.
    grad_bound = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
    assert_matches_oracle(grad, oracle_grad, reference_grad, dtype, "dθ", absolute_bound=grad_bound)


@pytest.mark.parametrize("norm", [0.0, 3.0, 50.0])
def test_gradient_at_large_norms(backend, norm):
    generator = torch.Generator().manual_seed(7)
    theta64 = rotation_with_norm(24, norm, generator)
    grad_rotation = torch.randn(24, 8, 8, dtype=torch.float64, generator=generator)
    leaf = theta64.clone().requires_grad_()
    (oracle_grad,) = torch.autograd.grad((torch.linalg.matrix_exp(skew_from_theta(leaf)) * grad_rotation).sum(), leaf)

    def run():
        leaf32 = theta64.float().to(DEVICE).requires_grad_()
        rotation, _ = so8_exp(leaf32)
        return torch.autograd.grad((rotation * grad_rotation.float().to(DEVICE)).sum(), leaf32)[0]

    # dθ grows with ‖A‖ (the squarings amplify G): 1e-5 relative to its largest entry is 30 fp32 ulps.
    assert_matches_oracle(run(), oracle_grad, with_backend("torch", run), torch.float32, "dθ", absolute_bound=1e-5)


def test_float64_gradcheck_of_reference():
    generator = torch.Generator().manual_seed(3)
    for norm in (0.5, 5.0, 40.0):
        theta = rotation_with_norm(3, norm, generator).requires_grad_()
        assert torch.autograd.gradcheck(lambda t: so8_exp(t)[0], (theta,), eps=1e-6, atol=1e-7)
    # The residual is a measurement: no gradient flows from it.
    theta = rotation_with_norm(2, 1.0, generator).requires_grad_()
    _, residual = so8_exp(theta)
    rotation, _ = so8_exp(theta)
    (grad,) = torch.autograd.grad(rotation.sum() + residual.sum(), theta)
    (grad_rotation_only,) = torch.autograd.grad(so8_exp(theta)[0].sum(), theta)
    assert torch.equal(grad, grad_rotation_only)


def test_float64_input_uses_float64_reference(backend):
    theta = rotation_with_norm(5, 2.0, torch.Generator().manual_seed(0)).to(DEVICE)
    rotation, residual = so8_exp(theta)
    assert rotation.dtype == torch.float64 and residual.dtype == torch.float64
    assert (rotation.cpu() - scipy_expm(theta)).abs().max() <= 1e-12


def test_every_output_element_is_written(backend, poisoned_allocations):
    theta = torch.randn(37, 28, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    rotation, residual = so8_exp(theta.requires_grad_())
    (grad,) = torch.autograd.grad(rotation.sum(), theta)
    assert torch.isfinite(rotation).all() and torch.isfinite(residual).all() and torch.isfinite(grad).all()
    if backend == "triton":
        assert poisoned_allocations, "the poison was never applied: the test could not fail"


def test_fresh_inputs_give_fresh_outputs(backend):
    """Two different θ give different R: nothing is cached between calls."""
    generator = torch.Generator().manual_seed(11)
    first, _ = so8_exp(torch.randn(9, 28, generator=generator).to(DEVICE))
    second, _ = so8_exp(torch.randn(9, 28, generator=generator).to(DEVICE))
    assert not torch.allclose(first, second)
    reference, _ = with_backend("torch", so8_exp, torch.zeros(9, 28, device=DEVICE))
    assert torch.equal(reference, torch.eye(8, device=DEVICE).expand(9, 8, 8))


def test_nonfinite_theta_propagates_like_reference(backend):
    theta = torch.randn(6, 28, generator=torch.Generator().manual_seed(2))
    theta[1, 4] = float("nan")
    theta[3, 0] = float("inf")
    theta[4, 27] = float("-inf")
    theta = theta.to(DEVICE)
    rotation, residual = so8_exp(theta)
    reference_rotation, reference_residual = with_backend("torch", so8_exp, theta)
    assert_same_nonfinite(rotation, reference_rotation, "R")
    assert_same_nonfinite(residual, reference_residual, "residual")
    healthy = [0, 2, 5]
    assert torch.allclose(rotation[healthy], reference_rotation[healthy], atol=1e-6)
    assert not torch.isfinite(residual[[1, 3, 4]]).any(), "a broken block must show in its residual"
    assert torch.isfinite(residual[healthy]).all()


def test_empty_batch(backend):
    rotation, residual = so8_exp(torch.zeros(0, 28, device=DEVICE))
    assert rotation.shape == (0, 8, 8) and residual.shape == (0,)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_theta_computes_in_fp32(backend, dtype):
    theta = torch.randn(4, 28, generator=torch.Generator().manual_seed(1)).to(dtype)
    rotation, residual = so8_exp(theta.to(DEVICE))
    assert rotation.dtype == torch.float32
    assert residual.max() <= 1e-5, "rotations must be orthogonal to fp32 precision whatever θ's dtype"
