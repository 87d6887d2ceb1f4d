"""logit_stats: one-pass statistics on every usable backend against a float64 oracle."""

import pytest
import torch
from ops_helpers import DEVICE, backend, poisoned_allocations, with_backend  # noqa: F401  (fixtures)

from so8t_kernels import logit_stats


def oracle_stats(logits: torch.Tensor) -> torch.Tensor:
    """float64, two passes, straight from the definition: over finite entries; NaN if there are none."""
    values = logits.detach().double().cpu().reshape(-1)
    finite = values[torch.isfinite(values)]
    nonfinite = float(values.numel() - finite.numel())
    if finite.numel() == 0:
        return torch.tensor([float("nan")] * 4 + [nonfinite], dtype=torch.float64)
    mean = finite.mean()
    std = ((finite - mean) ** 2).mean().sqrt()
    return torch.stack([mean, std, finite.min(), finite.max(), torch.tensor(nonfinite, dtype=torch.float64)])


def assert_stats_close(actual, expected, rtol):
    assert actual.dtype == torch.float32 and actual.shape == (5,)
    actual = actual.cpu().double()
    assert torch.equal(actual[4], expected[4]), f"non-finite count {actual[4]} != {expected[4]}"
    scale = expected[1].abs() + expected[0].abs()  # mean's error scales with the spread and the offset
    assert (actual[0] - expected[0]).abs() <= rtol * scale, f"mean {actual[0]} vs {expected[0]}"
    assert (actual[1] - expected[1]).abs() <= rtol * expected[1].abs(), f"std {actual[1]} vs {expected[1]}"
    # min and max are exact: they pick an input value (as fp32).
    assert torch.equal(actual[2:4], expected[2:4].float().double()), f"min/max {actual[2:4]} vs {expected[2:4]}"


@pytest.mark.parametrize("shape", [(1,), (7, 33), (2, 7, 1000), (3, 4097)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_values_against_float64(backend, shape, dtype):
    generator = torch.Generator().manual_seed(sum(shape))
    logits = (torch.randn(*shape, generator=generator) * 3 + 1.5).to(dtype)
    # fp32 accumulation of ≤ 28k values: 1e-5 relative is ~80 ulps; the inputs are exact in every dtype.
    assert_stats_close(logit_stats(logits.to(DEVICE)), oracle_stats(logits), rtol=1e-5)


def test_std_is_accurate_when_mean_dominates(backend):
    """Σx² − (Σx)²/n in fp32 would lose every digit here (mean 1e4, std 1e-2); merging M2 does not."""
    generator = torch.Generator().manual_seed(1)
    logits = 1e4 + torch.randn(4, 5000, generator=generator, dtype=torch.float64) * 1e-2
    logits = logits.float()
    stats = logit_stats(logits.to(DEVICE))
    expected = oracle_stats(logits)
    assert abs(stats[1].item() - expected[1].item()) <= 1e-2 * expected[1].item()


def test_nonfinite_entries_are_counted_and_excluded(backend):
    logits = torch.randn(7, 1000, generator=torch.Generator().manual_seed(2))
    logits[0, 3] = float("nan")
    logits[4, 999] = float("inf")
    logits[6, 0] = float("-inf")
    stats = logit_stats(logits.to(DEVICE))
    assert_stats_close(stats, oracle_stats(logits), rtol=1e-5)
    assert stats[4].item() == 3 and torch.isfinite(stats[:4]).all()


def test_all_nonfinite_gives_nan_statistics(backend):
    logits = torch.full((3, 5), float("nan"))
    logits[1, 1] = float("inf")
    stats = logit_stats(logits.to(DEVICE)).cpu()
    assert torch.isnan(stats[:4]).all() and stats[4].item() == 15


def test_non_contiguous_and_requires_grad_input(backend):
    base = torch.randn(40, 30, generator=torch.Generator().manual_seed(3), requires_grad=True)
    view = base.T[::2]
    stats = logit_stats(view.to(DEVICE))
    assert not stats.requires_grad
    assert_stats_close(stats, oracle_stats(view), rtol=1e-5)


def test_every_partial_is_written(backend, poisoned_allocations):
    logits = torch.randn(3, 9000, generator=torch.Generator().manual_seed(4))
    stats = logit_stats(logits.to(DEVICE))
    assert_stats_close(stats, oracle_stats(logits), rtol=1e-5)
    if backend == "triton":
        assert poisoned_allocations, "the poison was never applied: the test could not fail"


def test_fresh_inputs_give_fresh_outputs(backend):
    first = logit_stats(torch.zeros(10, device=DEVICE))
    second = logit_stats(torch.ones(10, device=DEVICE))
    assert first[0] == 0 and second[0] == 1
    assert torch.equal(with_backend("torch", logit_stats, torch.ones(10, device=DEVICE)), second)
