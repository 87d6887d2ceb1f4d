"""so8_rotate: values, statistics and gradients on every usable backend against float64 oracles."""

import pytest
import torch
from ops_helpers import (
    DEVICE,
    assert_matches_oracle,
    assert_same_nonfinite,
    backend,  # noqa: F401  (fixture)
    poisoned_allocations,  # noqa: F401  (fixture)
    with_backend,
)

from so8t_kernels import so8_exp, so8_rotate
from so8t_kernels.so8_rotate import activation_stats_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (leading shape, hidden size): 1 and 7 tokens, 3-d inputs, d = 8, 24, 136 and a 3072-wide slice.
SHAPES = [((1,), 8), ((7,), 24), ((2, 7), 136), ((7,), 3072), ((3, 1, 2), 24)]


def random_rotations(num_blocks: int, generator: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    theta = torch.randn(num_blocks, 28, generator=generator, dtype=torch.float64) * scale
    return so8_exp(theta)[0]


def oracle_rotate(x, rotation, alpha):
    """Independent float64 formula, straight from the definition: y_b = x_b + g(R_b x_b − x_b), g = σ(α)."""
    gate = torch.sigmoid(alpha)
    blocks = x.unflatten(-1, (-1, 8))
    rotated = (rotation * blocks.unsqueeze(-2)).sum(-1)  # (R x)_i = Σ_j R_ij x_j
    return (blocks + gate * (rotated - blocks)).flatten(-2)


def make_inputs(lead, hidden, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(*lead, hidden, generator=generator, dtype=torch.float64) * 2).to(dtype)
    rotation = random_rotations(hidden // 8, generator)
    alpha = torch.tensor(0.7, dtype=torch.float64)
    # Rounded to x's dtype, as autograd hands it to the backward, so the oracle sees the same values.
    grad_y = torch.randn(*lead, hidden, generator=generator, dtype=torch.float64).to(dtype).double()
    return x, rotation, alpha, grad_y


@pytest.mark.parametrize("lead,hidden", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_values_and_gradients_against_float64(backend, lead, hidden, dtype):
    x, rotation, alpha, grad_y = make_inputs(lead, hidden, dtype, seed=hidden + len(lead))
    leaves = [x.double().requires_grad_(), rotation.clone().requires_grad_(), alpha.clone().requires_grad_()]
    oracle = oracle_rotate(*leaves)
    oracle_grads = torch.autograd.grad((oracle * grad_y).sum(), leaves)

    def run():
        inputs = [
            x.to(DEVICE).requires_grad_(),
            rotation.float().to(DEVICE).requires_grad_(),
            alpha.float().to(DEVICE).requires_grad_(),
        ]
        y = so8_rotate(*inputs)
        grads = torch.autograd.grad((y * grad_y.to(DEVICE, dtype)).sum(), inputs)
        return y, grads

    y, grads = run()
    reference_y, reference_grads = with_backend("torch", run)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
    # fp32 reference: a handful of ulps; 16-bit: one rounding of the output (≤ eps/2).
    # Compiled on a GPU the Triton kernel differs from the interpreter in ways this rule absorbs:
    # σ(α) through ex2.approx and div.full (≤ ~4 ulp of g, ≤ 2.4e-7 relative in g(Rx − x) at
    # α = 0.7), the 8 products FMA-contracted (one rounding fewer per term), and stores that round
    # to nearest (the interpreter truncates fp32 → bf16; eps, not eps/2, is the floor below).
    bound = 2e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
    assert_matches_oracle(y, oracle, reference_y, dtype, "y", absolute_bound=bound)
    assert_matches_oracle(grads[0], oracle_grads[0], reference_grads[0], dtype, "dx", absolute_bound=bound)
    # dR and dα reduce over all tokens in fp32 whatever x's dtype: 1e-5 is ~80 fp32 ulps of the largest.
    # On a GPU the token sum runs in another order (per thread, then across warps, then over the
    # token programs' partials) with FMA contraction: the same error size, other bits.
    param_bound = 1e-5
    assert_matches_oracle(grads[1], oracle_grads[1], reference_grads[1], torch.float32, "dR", param_bound)
    gate = torch.sigmoid(alpha)
    terms = torch.einsum("...bi,...bj->bij", grad_y.abs().unflatten(-1, (-1, 8)), x.double().abs().unflatten(-1, (-1, 8)))
    dalpha_condition = (gate * (1 - gate) * (terms * (rotation - torch.eye(8, dtype=torch.float64)).abs()).sum()).item()
    assert_matches_oracle(
        grads[2], oracle_grads[2], reference_grads[2], torch.float32, "dα", param_bound, scale=dalpha_condition
    )


def test_float64_gradcheck_of_reference():
    x, rotation, alpha, _ = make_inputs((3,), 24, torch.float64, seed=1)
    leaves = (x.requires_grad_(), rotation.requires_grad_(), alpha.requires_grad_())
    assert torch.autograd.gradcheck(so8_rotate, leaves, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
def test_stats_describe_the_returned_output(backend, dtype):
    x, rotation, alpha, _ = make_inputs((2, 7), 136, dtype, seed=4)
    stats = torch.full((3,), float("nan"), device=DEVICE)
    y = so8_rotate(x.to(DEVICE), rotation.float().to(DEVICE), alpha.float().to(DEVICE), stats=stats)
    expected = activation_stats_reference(y.double())
    # Σ y² is summed in fp32 in a backend-specific order: 1e-5 relative is 80 fp32 ulps over 1904 terms.
    assert torch.allclose(stats.cpu().double(), expected.double(), rtol=1e-5, atol=0)
    plain = so8_rotate(x.to(DEVICE), rotation.float().to(DEVICE), alpha.float().to(DEVICE))
    assert torch.equal(plain, y), "asking for statistics must not change y"


def test_stats_are_overwritten_not_accumulated(backend):
    x, rotation, alpha, _ = make_inputs((7,), 24, torch.float32, seed=5)
    args = (x.to(DEVICE), rotation.float().to(DEVICE), alpha.float().to(DEVICE))
    stats = torch.tensor([1e9, 1e9, 1e9], device=DEVICE)
    so8_rotate(*args, stats=stats)
    first = stats.clone()
    so8_rotate(*args, stats=stats)
    assert torch.equal(first, stats) and first[0] < 1e9 and first[2] == 0
    leaves = [arg.clone().requires_grad_() for arg in args]
    so8_rotate(*leaves, stats=stats)
    assert not stats.requires_grad and stats.grad_fn is None, "the stats buffer must not join the graph"


def test_nonfinite_inputs_stay_in_their_chunk_and_are_counted(backend):
    x, rotation, alpha, _ = make_inputs((7,), 136, torch.float32, seed=6)
    x[2, 9] = float("nan")  # token 2, chunk 1
    x[5, 130] = float("inf")  # token 5, chunk 16
    stats = torch.zeros(3, device=DEVICE)
    y = so8_rotate(x.to(DEVICE), rotation.float().to(DEVICE), alpha.float().to(DEVICE), stats=stats)
    reference = with_backend("torch", so8_rotate, x.to(DEVICE), rotation.float().to(DEVICE), alpha.float().to(DEVICE))
    assert_same_nonfinite(y, reference, "y")
    broken = torch.zeros_like(x, dtype=torch.bool)
    broken[2, 8:16] = broken[5, 128:136] = True
    assert torch.equal(~torch.isfinite(y.cpu()), broken), "a non-finite input must not leak out of its chunk"
    assert stats[2].item() == 16
    finite = y.cpu()[~broken]
    assert torch.allclose(stats[0].cpu(), (finite.double() ** 2).sum().float(), rtol=1e-5)
    assert stats[1].item() == finite.abs().max().item()


def test_fp16_overflow_is_counted_as_nonfinite(backend):
    x = torch.full((1, 8), 60000.0, dtype=torch.float16)
    rotation = torch.eye(8).unsqueeze(0)
    rotation[0, 0, 1] = 1.0  # row 0 of R x sums two 60000s: 120000 overflows fp16
    stats = torch.zeros(3, device=DEVICE)
    y = so8_rotate(x.to(DEVICE), rotation.to(DEVICE), torch.tensor(10.0, device=DEVICE), stats=stats)
    assert torch.isinf(y[0, 0]) and stats[2].item() == 1


def test_every_output_element_is_written(backend, poisoned_allocations):
    x, rotation, alpha, grad_y = make_inputs((7,), 136, torch.float32, seed=8)
    inputs = [x.to(DEVICE).requires_grad_(), rotation.float().to(DEVICE).requires_grad_(), alpha.float().to(DEVICE).requires_grad_()]
    y = so8_rotate(*inputs)
    grads = torch.autograd.grad((y * grad_y.float().to(DEVICE)).sum(), inputs)
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)
    if backend == "triton":
        assert poisoned_allocations, "the poison was never applied: the test could not fail"


def test_non_contiguous_inputs(backend):
    generator = torch.Generator().manual_seed(9)
    base = torch.randn(24, 7, generator=generator)
    rotation = random_rotations(3, generator).float()
    alpha = torch.tensor(-0.3)
    for x in (base.T, torch.randn(7, 48, generator=generator)[:, 8:32], torch.randn(7, 2, 24, generator=generator)[:, 1]):
        y = so8_rotate(x.to(DEVICE), rotation.to(DEVICE), alpha.to(DEVICE))
        expected = oracle_rotate(x.double(), rotation.double(), alpha.double())
        assert torch.allclose(y.cpu().double(), expected, atol=1e-5), f"strides {x.stride()}"


def test_only_requested_gradients_are_computed(backend):
    x, rotation, alpha, grad_y = make_inputs((7,), 24, torch.float32, seed=10)
    frozen_rotation = rotation.float().to(DEVICE)
    leaf = x.to(DEVICE).requires_grad_()
    y = so8_rotate(leaf, frozen_rotation, alpha.float().to(DEVICE))
    (grad_x,) = torch.autograd.grad((y * grad_y.float().to(DEVICE)).sum(), leaf)
    expected = with_backend("torch", lambda: torch.autograd.grad(
        (so8_rotate(leaf, frozen_rotation, alpha.float().to(DEVICE)) * grad_y.float().to(DEVICE)).sum(), leaf)[0])
    assert torch.allclose(grad_x, expected, atol=1e-6)
    params = [rotation.float().to(DEVICE).requires_grad_(), alpha.float().to(DEVICE).requires_grad_()]
    y = so8_rotate(x.to(DEVICE), *params)
    grads = torch.autograd.grad(y.sum(), params)
    assert grads[0].shape == (3, 8, 8) and grads[1].shape == ()


def test_gate_limits(backend):
    """α → −∞ returns x exactly; α → +∞ applies R; θ = 0 (R = I) returns x exactly."""
    x, rotation, _, _ = make_inputs((7,), 24, torch.float32, seed=12)
    x, rotation = x.to(DEVICE), rotation.float().to(DEVICE)
    assert torch.equal(so8_rotate(x, rotation, torch.tensor(-200.0, device=DEVICE)), x)
    identity = torch.eye(8, device=DEVICE).expand(3, 8, 8).contiguous()
    assert torch.equal(so8_rotate(x, identity, torch.tensor(0.4, device=DEVICE)), x)
    full = so8_rotate(x, rotation, torch.tensor(200.0, device=DEVICE))
    expected = (rotation * x.unflatten(-1, (-1, 8)).unsqueeze(-2)).sum(-1).flatten(-2)
    assert torch.allclose(full, expected, atol=1e-6)
    assert not torch.allclose(full, x)


def test_empty_token_batch(backend):
    y = so8_rotate(torch.zeros(0, 16, device=DEVICE), torch.eye(8, device=DEVICE).expand(2, 8, 8), torch.tensor(0.0, device=DEVICE))
    assert y.shape == (0, 16)


def test_long_sequences_reduce_every_token(backend):
    """1200 tokens: the backward splits the Σ_tokens of dR and dα over several chunks and tiles."""
    x, rotation, alpha, grad_y = make_inputs((2, 600), 16, torch.float32, seed=13)
    leaves = [x.double().requires_grad_(), rotation.clone().requires_grad_(), alpha.clone().requires_grad_()]
    oracle_grads = torch.autograd.grad((oracle_rotate(*leaves) * grad_y).sum(), leaves)
    inputs = [x.to(DEVICE).requires_grad_(), rotation.float().to(DEVICE).requires_grad_(), alpha.float().to(DEVICE).requires_grad_()]
    grads = torch.autograd.grad((so8_rotate(*inputs) * grad_y.float().to(DEVICE)).sum(), inputs)
    for grad, oracle, name in zip(grads, oracle_grads, ("dx", "dR", "dα")):
        assert torch.allclose(grad.cpu().double(), oracle, rtol=1e-4, atol=1e-4), name


def test_stats_and_parameter_gradients_are_bit_reproducible(backend):
    """Partial sums reduced in a fixed order, no atomics: the same bits every run. 136 tokens × 33
    chunks spread the Triton forward over 2 × 3 programs and the backward over 2 × 5."""
    x, rotation, alpha, grad_y = make_inputs((136,), 264, torch.float32, seed=14)
    x[::9, 5::16] = float("nan")  # in 16 tokens × 17 chunks: 2176 non-finite outputs, counted exactly
    runs = []
    for _ in range(2):
        leaves = [x.to(DEVICE), rotation.float().to(DEVICE).requires_grad_(), alpha.float().to(DEVICE).requires_grad_()]
        stats = torch.zeros(3, device=DEVICE)
        y = so8_rotate(*leaves, stats=stats)
        grads = torch.autograd.grad((y.nan_to_num() * grad_y.float().to(DEVICE)).sum(), leaves[1:])
        runs.append((stats.cpu(), *(grad.cpu() for grad in grads)))
    assert runs[0][0][2].item() == 16 * 17 * 8
    for first, second, name in zip(*runs, ("stats", "dR", "dα")):
        torch.testing.assert_close(first, second, rtol=0, atol=0, equal_nan=True, msg=f"{name} differs between two runs")
