"""The C++ CPU backend (csrc/) specifically: it loaded, it matches the fp32 PyTorch reference to a few
ulps on awkward inputs, and its reductions give the same bits on every run and for any thread count.

The op suites (test_so8_exp.py, test_so8_rotate.py, test_logit_stats.py, test_linear_cross_entropy.py)
run against every usable backend, cpp included, with the float64 oracle and the same tolerances; these
tests add what only this backend can get wrong. With SO8T_REQUIRE_CPP=1 (CI) a missing extension fails
the run instead of only skipping these tests.
"""

import os

import pytest
import torch

from so8t_kernels import _cpp, logit_stats, so8_exp, so8_rotate
from so8t_kernels.logit_stats import logit_stats_reference
from so8t_kernels.so8_exp import (
    MAX_SQUARINGS,
    SCALED_NORM_MAX,
    TAYLOR_DEGREE,
    exp_backward_reference,
    exp_reference,
)
from so8t_kernels.so8_rotate import rotate_backward_reference, rotate_reference

WHY_UNAVAILABLE = _cpp.why_unavailable()
REQUIRED = os.environ.get("SO8T_REQUIRE_CPP") == "1"


def test_extension_is_loaded_when_required():
    if REQUIRED:
        assert WHY_UNAVAILABLE is None, f"SO8T_REQUIRE_CPP=1 but {WHY_UNAVAILABLE}"
    elif WHY_UNAVAILABLE is not None:
        pytest.skip(WHY_UNAVAILABLE)
    assert _cpp.describe().startswith("active: built against torch ")


# Without the extension the tests below skip; test_extension_is_loaded_when_required is the one failure.
needs_cpp = pytest.mark.skipif(WHY_UNAVAILABLE is not None, reason=str(WHY_UNAVAILABLE))
ops = torch.ops.so8t_cpp
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def ulp_close(actual: torch.Tensor, expected: torch.Tensor, ulps: float, scale: float | None = None):
    """|actual − expected| ≤ ulps · eps(dtype) · scale elementwise, with identical non-finite positions.

    scale defaults to max |expected| (finite entries): both sides are fp32 sums of 8–64 terms whose order
    differs, so they agree to a few roundings of the largest term, not of each (possibly tiny) result.
    """
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    eps = max(torch.finfo(actual.dtype).eps, torch.finfo(torch.float32).eps)  # fp64 outputs are fp32 math
    actual, expected = actual.double(), expected.double()
    assert torch.equal(torch.isnan(actual), torch.isnan(expected)), "NaN positions differ"
    finite = torch.isfinite(expected)
    assert torch.equal(actual[~finite & ~torch.isnan(expected)], expected[~finite & ~torch.isnan(expected)])
    if not finite.any():
        return
    if scale is None:
        scale = expected[finite].abs().max().item()
    bound = ulps * eps * max(scale, 1e-30)
    error = (actual - expected)[finite].abs().max().item()
    assert error <= bound, f"max error {error:.3e} > {bound:.3e}"


def rotation_matrices(blocks: int, generator) -> torch.Tensor:
    return exp_reference(torch.randn(blocks, 28, generator=generator) * 0.5)[0]


# --------------------------------------------------------------------------------------------------
# Build facts
# --------------------------------------------------------------------------------------------------
@needs_cpp
def test_constants_agree_with_so8_exp():
    import so8t_kernels._C as extension

    assert extension.TAYLOR_DEGREE == TAYLOR_DEGREE[torch.float32]
    assert extension.SCALED_NORM_MAX == SCALED_NORM_MAX
    assert extension.MAX_SQUARINGS == MAX_SQUARINGS


@needs_cpp
def test_extension_matches_running_torch_and_auto_picks_it(monkeypatch):
    import so8t_kernels._C as extension
    from so8t_kernels import _backend

    assert extension.TORCH_VERSION == torch.__version__.split("+")[0]
    monkeypatch.delenv("SO8T_BACKEND", raising=False)
    assert _backend.choose_backend("so8_rotate", torch.device("cpu")) == "cpp"


def test_a_mismatched_build_is_refused(monkeypatch):
    monkeypatch.setattr(_cpp, "_status", {})
    monkeypatch.setattr(torch, "__version__", "0.0.1+cpu")
    why = _cpp.why_unavailable()
    if WHY_UNAVAILABLE is None:
        assert why is not None and "built against torch" in why and "this is torch 0.0.1" in why
    assert _cpp.describe().startswith("inactive: ")


# --------------------------------------------------------------------------------------------------
# so8_exp
# --------------------------------------------------------------------------------------------------
@needs_cpp
def test_exp_matches_reference_from_norm_0_to_50():
    """‖A‖_F over 0…50 covers 0 to 5 squarings; every residual stays ≤ 1e-5 and R, dθ agree with the
    fp32 reference to a few ulps (of R's entries, ≤ 1, and of the gradient's largest entry)."""
    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(201, 28, generator=generator)
    norms = torch.linspace(0, 50, 201)
    theta = direction / direction.norm(dim=1, keepdim=True) * norms[:, None] / 2**0.5  # ‖A‖_F = √2 ‖θ‖
    rotation, residual = ops.exp_forward(theta)
    expected, expected_residual = exp_reference(theta)
    assert residual.max() <= 1e-5
    ulp_close(rotation, expected, ulps=64, scale=1.0)
    ulp_close(residual, expected_residual, ulps=1, scale=1e-5 / torch.finfo(torch.float32).eps)
    grad = torch.randn(201, 8, 8, generator=generator)
    actual_grad = ops.exp_backward(grad, theta)
    expected_grad = exp_backward_reference(grad, theta)
    ulp_close(actual_grad, expected_grad, ulps=64)


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [(1,), (7,), (2, 3)])
def test_exp_low_precision_and_batch_shapes(dtype, batch):
    generator = torch.Generator().manual_seed(1)
    theta = (torch.randn(*batch, 28, generator=generator) * 0.7).to(dtype)
    rotation, residual = ops.exp_forward(theta)
    expected, _ = exp_reference(theta)
    assert rotation.dtype == residual.dtype == torch.float32 and residual.shape == batch
    ulp_close(rotation, expected, ulps=16, scale=1.0)
    grad = torch.randn(*batch, 8, 8, generator=generator)
    grad_theta = ops.exp_backward(grad, theta)
    assert grad_theta.dtype == dtype and grad_theta.shape == theta.shape
    ulp_close(grad_theta, exp_backward_reference(grad, theta), ulps=2)


@needs_cpp
def test_exp_nonfinite_theta_stays_in_its_block():
    theta = torch.randn(4, 28) * 0.3
    theta[1, 5] = float("nan")
    theta[2, 0] = float("inf")
    rotation, residual = ops.exp_forward(theta)
    expected, expected_residual = exp_reference(theta)
    ulp_close(rotation, expected, ulps=16, scale=1.0)
    assert torch.equal(torch.isnan(residual), torch.isnan(expected_residual))
    assert torch.isfinite(rotation[[0, 3]]).all() and torch.isnan(rotation[1]).all()
    grad_theta = ops.exp_backward(torch.ones(4, 8, 8), theta)
    ulp_close(grad_theta, exp_backward_reference(torch.ones(4, 8, 8), theta), ulps=16)


# --------------------------------------------------------------------------------------------------
# so8_rotate
# --------------------------------------------------------------------------------------------------
def rotate_both(x, rotation, alpha, grad_y):
    """(cpp, reference) pairs of y, stats, dx, dR, dα."""
    y, y_stats = ops.rotate_forward(x, rotation, alpha, True)
    grads = ops.rotate_backward(grad_y, x, rotation, alpha, True, True)
    expected_y, expected_stats = rotate_reference(x, rotation, alpha, True)
    expected_grads = rotate_backward_reference(grad_y, x, rotation, alpha, True, True)
    return (y, y_stats, *grads), (expected_y, expected_stats, *expected_grads)


def assert_rotate_matches(x, rotation, alpha, grad_y):
    actual, expected = rotate_both(x, rotation, alpha, grad_y)
    for name, a, e in zip(("y", "stats", "grad_x", "grad_rotation", "grad_alpha"), actual, expected):
        assert a.shape == e.shape and a.dtype == e.dtype, name
    y, y_stats, grad_x, grad_rotation, grad_alpha = actual
    e_y, e_stats, e_grad_x, e_grad_rotation, e_grad_alpha = expected
    # y and dx are 8-term fp32 sums in x's dtype: a few fp32 ulps apart, so a rounded output differs
    # from the reference's by at most one ulp of its dtype where the two straddle a rounding boundary.
    ulps = 8 if x.dtype == torch.float32 else 1
    ulp_close(y, e_y, ulps)
    ulp_close(grad_x, e_grad_x, ulps)
    assert y_stats[2] == e_stats[2], "non-finite count"
    ulp_close(y_stats[:2], e_stats[:2], ulps=64)
    # S_b = Σ_tokens dy_b x_bᵀ sums its terms in another order: error relative to Σ|terms|.
    gate = torch.sigmoid(alpha.float())
    term_bound = x.numel() // x.shape[-1] * x.float().abs().max() * grad_y.float().abs().max()
    ulp_close(grad_rotation, e_grad_rotation, ulps=16, scale=(gate * term_bound).item())
    alpha_scale = gate * (1 - gate) * term_bound * (rotation.float() - torch.eye(8)).abs().sum()
    ulp_close(grad_alpha, e_grad_alpha, ulps=16, scale=alpha_scale.item())


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [8, 24, 136, 3072])
@pytest.mark.parametrize("tokens", [1, 7])
def test_rotate_matches_reference_on_odd_shapes(tokens, hidden, dtype):
    generator = torch.Generator().manual_seed(hidden + tokens)
    x = torch.randn(tokens, hidden, generator=generator).to(dtype)
    grad_y = torch.randn(tokens, hidden, generator=generator).to(dtype)
    assert_rotate_matches(x, rotation_matrices(hidden // 8, generator), torch.tensor(-0.7), grad_y)


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotate_non_contiguous_inputs(dtype):
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(5, 9, 2, 40, generator=generator).to(dtype)
    strided_rows = base[:, 1:8:2, 0]  # [5, 4, 40], rows 160 values apart: read in place
    transposed = base[:, :, 1].transpose(0, 1)  # [9, 5, 40], not viewable as rows: copied first
    rotation = rotation_matrices(5, generator)
    for x in (strided_rows, transposed):
        grad_y = torch.randn(x.shape, generator=generator).to(dtype).transpose(0, 1).contiguous().transpose(0, 1)
        assert_rotate_matches(x, rotation, torch.tensor(0.4, dtype=torch.float64), grad_y)


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotate_nonfinite_inputs(dtype):
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(7, 24, generator=generator).to(dtype)
    x[0, 3], x[2, 9], x[6, 23] = float("nan"), float("inf"), float("-inf")
    grad_y = torch.randn(7, 24, generator=generator).to(dtype)
    grad_y[4, 0] = float("nan")
    actual, expected = rotate_both(x, rotation_matrices(3, generator), torch.tensor(-1.0), grad_y)
    for name, a, e in zip(("y", "stats", "grad_x", "grad_rotation"), actual, expected):
        assert torch.equal(torch.isnan(a), torch.isnan(e)), name
        assert torch.equal(torch.isinf(a), torch.isinf(e)), name
    assert actual[1][2] == expected[1][2] == 3 * 8


@needs_cpp
def test_rotate_mixed_gradient_dtype_and_partial_requests():
    """Autograd passes dy in x's dtype; a direct call with another dtype is still the reference's math."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(3, 16, generator=generator).bfloat16()
    grad_y = torch.randn(3, 16, generator=generator)
    rotation, alpha = rotation_matrices(2, generator), torch.tensor(0.2)
    for need_x, need_params in ((True, False), (False, True), (False, False), (True, True)):
        actual = ops.rotate_backward(grad_y, x, rotation, alpha, need_x, need_params)
        expected = rotate_backward_reference(grad_y, x, rotation, alpha, need_x, need_params)
        for a, e in zip(actual, expected):
            torch.testing.assert_close(a, e)  # dtype-aware: one bf16 ulp apart at most


@needs_cpp
def test_rotate_empty_token_batch():
    rotation = torch.eye(8).expand(2, 8, 8)
    y, y_stats = ops.rotate_forward(torch.empty(0, 16), rotation, torch.tensor(0.0), True)
    assert y.shape == (0, 16) and y_stats.tolist() == [0.0, 0.0, 0.0]
    grad_x, grad_rotation, grad_alpha = ops.rotate_backward(
        torch.empty(0, 16), torch.empty(0, 16), rotation, torch.tensor(0.0), True, True
    )
    assert grad_x.shape == (0, 16) and not grad_rotation.any() and grad_alpha == 0


@needs_cpp
def test_direct_calls_reject_bad_input():
    with pytest.raises(RuntimeError, match="theta has dtype Double"):
        ops.exp_forward(torch.zeros(2, 28, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"expected \[\.\.\., 28\]"):
        ops.exp_forward(torch.zeros(2, 27))
    with pytest.raises(RuntimeError, match="last dimension must be a positive multiple of 8"):
        ops.rotate_forward(torch.zeros(2, 12), torch.zeros(1, 8, 8), torch.tensor(0.0), False)
    with pytest.raises(RuntimeError, match=r"expected \(2, 8, 8\)"):
        ops.rotate_forward(torch.zeros(2, 16), torch.zeros(1, 8, 8), torch.tensor(0.0), False)
    with pytest.raises(RuntimeError, match="logits has dtype Int"):
        ops.logit_stats(torch.zeros(3, dtype=torch.int32))


# --------------------------------------------------------------------------------------------------
# logit_stats
# --------------------------------------------------------------------------------------------------
@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("numel", [1, 15, 4096, 3 * 4096 + 5, 40_000])
def test_logit_stats_matches_reference(numel, dtype):
    """Sizes around the 4096-value tile and the 16-lane vectors; mean 3 ≫ std 0.1 tests the centring."""
    generator = torch.Generator().manual_seed(numel)
    logits = (torch.randn(numel, generator=generator) * 0.1 + 3).to(dtype)
    actual, expected = ops.logit_stats(logits), logit_stats_reference(logits)
    torch.testing.assert_close(actual, expected, rtol=2e-6, atol=0)


@needs_cpp
def test_logit_stats_nonfinite_and_extreme_values():
    reference = logit_stats_reference
    generator = torch.Generator().manual_seed(6)
    mixed = torch.randn(3 * 4096 + 7, generator=generator)
    mixed[[5, 4100, 9000, 12290]] = torch.tensor([float("nan"), float("inf"), float("-inf"), float("nan")])
    huge = torch.randn(5000, generator=generator) * 1e36  # the fp32 tile sum overflows: fp64 fallback
    for logits in (mixed, huge, torch.full((5000,), float("nan")), torch.full((7,), float("-inf")), torch.empty(0)):
        actual, expected = ops.logit_stats(logits), reference(logits)
        torch.testing.assert_close(actual, expected, rtol=2e-6, atol=0, equal_nan=True)


# --------------------------------------------------------------------------------------------------
# Determinism and thread-count independence
# --------------------------------------------------------------------------------------------------
def all_outputs(theta, x, rotation, alpha, grad_y, grad_rotation, logits):
    return (
        *ops.exp_forward(theta),
        ops.exp_backward(grad_rotation, theta),
        *ops.rotate_forward(x, rotation, alpha, True),
        *ops.rotate_backward(grad_y, x, rotation, alpha, True, True),
        ops.logit_stats(logits),
    )


@needs_cpp
def test_same_bits_on_every_run_and_for_any_thread_count():
    """Work is split into fixed chunks whose partial sums merge in a fixed order, so neither a rerun nor
    the thread count changes a bit (sizes large enough that every kernel runs on several threads)."""
    generator = torch.Generator().manual_seed(7)
    theta = torch.randn(2000, 28, generator=generator)
    x = torch.randn(1000, 512, generator=generator)
    grad_y = torch.randn(1000, 512, generator=generator)
    rotation = rotation_matrices(64, generator)
    inputs = (theta, x, rotation, torch.tensor(-1.3), grad_y, torch.randn(2000, 8, 8, generator=generator),
              torch.randn(300_000, generator=generator))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = all_outputs(*inputs)
        torch.set_num_threads(max(2, threads))
        first, second = all_outputs(*inputs), all_outputs(*inputs)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(single, first, second):
        assert torch.equal(a, b) and torch.equal(b, c)


# --------------------------------------------------------------------------------------------------
# Through the public API: opcheck and torch.compile
# --------------------------------------------------------------------------------------------------
@needs_cpp
def test_opcheck_backward_ops_on_cpp():
    generator = torch.Generator().manual_seed(8)
    theta = torch.randn(5, 28, generator=generator)
    torch.library.opcheck(torch.ops.so8t.so8_exp_backward.default, (torch.randn(5, 8, 8), theta, "cpp"))
    x = torch.randn(2, 3, 24, generator=generator).bfloat16()
    rotation, alpha = rotation_matrices(3, generator), torch.tensor(0.3)
    for need_x, need_params in ((True, True), (True, False), (False, True)):
        args = (torch.randn_like(x), x, rotation, alpha, need_x, need_params, "cpp")
        torch.library.opcheck(torch.ops.so8t.so8_rotate_backward.default, args)


@needs_cpp
def test_compile_fullgraph_with_cpp_backend(monkeypatch):
    monkeypatch.setenv("SO8T_BACKEND", "cpp")

    def gated_layer(theta, x, alpha, activation_stats):
        rotation, residual = so8_exp(theta)
        y = so8_rotate(x, rotation, alpha, stats=activation_stats)
        return y.square().mean() + residual.sum(), logit_stats(y)

    generator = torch.Generator().manual_seed(9)
    theta = (torch.randn(3, 28, generator=generator) * 0.5).requires_grad_()
    alpha = torch.tensor(-1.0, requires_grad=True)
    x = torch.randn(2, 5, 24, generator=generator).requires_grad_()
    eager_stats, compiled_stats = torch.zeros(3), torch.zeros(3)
    eager_loss, eager_logit_stats = gated_layer(theta, x, alpha, eager_stats)
    eager_grads = torch.autograd.grad(eager_loss, (theta, x, alpha))
    torch._dynamo.reset()
    loss, compiled_logit_stats = torch.compile(gated_layer, fullgraph=True)(theta, x, alpha, compiled_stats)
    grads = torch.autograd.grad(loss, (theta, x, alpha))
    # The kernels give the same bits in both; the loss around them is Inductor's code, not eager's.
    assert torch.equal(compiled_stats, eager_stats) and compiled_stats[0] > 0
    assert torch.equal(compiled_logit_stats, eager_logit_stats)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=0)
    for grad, expected in zip(grads, eager_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-7)
