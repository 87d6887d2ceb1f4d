"""linear_cross_entropy on every usable backend against a float64 oracle that materialises the logits.

The oracle is the model's own loss path in float64: logits = hidden @ weightᵀ + bias, F.cross_entropy,
autograd for the gradients, ``logit_stats``-style statistics over the logits, entropy and top-1 from
softmax and argmax. The yardstick for a backend's error is the same path run in the input dtype (what
the model computes today): at most twice its error (ops_helpers.assert_matches_oracle).
"""

import importlib

import pytest
import torch
import torch.nn.functional as F
from ops_helpers import DEVICE, assert_matches_oracle, backend, poisoned_allocations  # noqa: F401  (fixtures)

from so8t_kernels import linear_cross_entropy, logit_stats
from so8t_kernels.linear_cross_entropy import NUM_STATS, default_chunk_size

lce = importlib.import_module("so8t_kernels.linear_cross_entropy")  # the attribute is the function
IGNORE = -100


def make_inputs(num_tokens, hidden_size, vocab, dtype, seed, ignored=(), with_bias=True, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, hidden_size, generator=generator).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=generator) * scale / hidden_size**0.5).to(dtype)
    bias = (torch.randn(vocab, generator=generator) * 0.1).to(dtype) if with_bias else None
    labels = torch.randint(0, vocab, (num_tokens,), generator=generator)
    labels[list(ignored)] = IGNORE
    return hidden, weight, bias, labels


def model_loss(hidden, weight, bias, labels, reduction="mean"):
    """The model's own path: logits in the input dtype, cross-entropy on their fp32 (fp64) copy."""
    logits = hidden @ weight.T if bias is None else torch.addmm(bias, hidden, weight.T)
    upcast = logits.double() if logits.dtype == torch.float64 else logits.float()
    return F.cross_entropy(upcast, labels, ignore_index=IGNORE, reduction=reduction), logits


def oracle_stats(logits64: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """float64, from the definitions: logit_stats of every logit; entropy and top-1 over kept tokens."""
    values = logits64.reshape(-1)
    finite = values[torch.isfinite(values)]
    kept = labels != IGNORE
    probs = logits64[kept].softmax(dim=-1)
    entropy = -(probs * probs.clamp_min(1e-300).log()).sum(dim=-1).mean()
    accuracy = (logits64[kept].gather(1, labels[kept, None])[:, 0] == logits64[kept].amax(dim=1)).double().mean()
    return torch.stack([
        finite.mean(), finite.std(correction=0), finite.min(), finite.max(),
        torch.tensor(float(values.numel() - finite.numel()), dtype=torch.float64), entropy, accuracy,
    ])


def leaves(*tensors):
    return [None if t is None else t.detach().clone().to(DEVICE).requires_grad_() for t in tensors]


def grads(loss, tensors, grad_loss=None):
    present = [t for t in tensors if t is not None]
    found = iter(torch.autograd.grad(loss, present, grad_loss))
    return [None if t is None else next(found) for t in tensors]


SHAPES = [  # (N, H, V, chunk): one token; chunks that do not divide N; V over the Triton tile and C++ flush
    (1, 8, 5, None),
    (7, 24, 37, 3),
    (13, 8, 2100, 4),
]


@pytest.mark.parametrize("num_tokens, hidden_size, vocab, chunk", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_gradients_and_stats_against_float64(backend, num_tokens, hidden_size, vocab, chunk, dtype):
    ignored = [num_tokens // 2] if num_tokens > 1 else []
    inputs = make_inputs(num_tokens, hidden_size, vocab, dtype, seed=num_tokens + vocab, ignored=ignored, scale=3.0)
    hidden, weight, bias, labels = inputs
    labels = labels.to(DEVICE)

    oracle_inputs = leaves(*(t.double() for t in (hidden, weight, bias)))
    oracle_loss, oracle_logits = model_loss(*oracle_inputs, labels)
    oracle_grads = grads(oracle_loss, oracle_inputs)
    reference_inputs = leaves(hidden, weight, bias)
    reference_loss, reference_logits = model_loss(*reference_inputs, labels)
    reference_grads = grads(reference_loss, reference_inputs)

    op_inputs = leaves(hidden, weight, bias)
    stats = torch.full((NUM_STATS,), float("nan"), device=DEVICE)
    loss = linear_cross_entropy(op_inputs[0], op_inputs[1], labels, bias=op_inputs[2], stats=stats, chunk_size=chunk)
    op_grads = grads(loss, op_inputs)

    # The model path's own error: fp32 roundings (≤ 2e-6: dhidden, a sum over 2,100 vocabulary rows, measured
    # 1.2e-6 on an AVX-512 CPU), or bf16 logits (≤ 2e-2, 4e-3 typical).
    bound = 2e-6 if dtype == torch.float32 else 2e-2
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_matches_oracle(loss, oracle_loss, reference_loss, torch.float32, "loss", bound)
    for name, actual, oracle, reference in zip(("hidden", "weight", "bias"), op_grads, oracle_grads, reference_grads):
        assert actual.dtype == dtype
        assert_matches_oracle(actual, oracle, reference, dtype, f"d{name}", bound)

    # Statistics: [0:5] are logit_stats of the logits the model materialises (in the input dtype).
    expected = oracle_stats(reference_logits.detach().double(), labels)
    materialised = logit_stats(reference_logits.detach())
    stats = stats.double().cpu()
    assert stats[4] == materialised[4] == 0
    close = 1e-5 if dtype == torch.float32 else 8e-3  # a chunk's matmul may round a bf16 logit the other way
    assert torch.allclose(stats[:4], materialised.double()[:4].cpu(), rtol=close, atol=close * stats[1].item())
    assert torch.allclose(stats[5], expected[5], rtol=1e-4), f"entropy {stats[5]} vs {expected[5]}"
    assert stats[6] == pytest.approx(expected[6].item(), abs=1.5 / num_tokens), "top-1 accuracy"


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_reductions_and_upstream_gradient(backend, reduction):
    hidden, weight, bias, labels = make_inputs(9, 16, 50, torch.float32, seed=3, ignored=[0, 5])
    labels = labels.to(DEVICE)
    oracle_inputs = leaves(*(t.double() for t in (hidden, weight, bias)))
    oracle_loss, _ = model_loss(*oracle_inputs, labels, reduction)
    op_inputs = leaves(hidden, weight, bias)
    loss = linear_cross_entropy(op_inputs[0], op_inputs[1], labels, bias=op_inputs[2], reduction=reduction, chunk_size=4)
    assert loss.shape == oracle_loss.shape and loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), oracle_loss.detach(), rtol=1e-6, atol=1e-6)
    if reduction == "none":
        assert torch.equal(loss[[0, 5]].cpu(), torch.zeros(2)), "ignored tokens give 0"
    upstream = torch.randn(oracle_loss.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for actual, oracle in zip(grads(loss, op_inputs, upstream.float().to(DEVICE)), grads(oracle_loss, oracle_inputs, upstream)):
        torch.testing.assert_close(actual.double(), oracle, rtol=1e-5, atol=1e-6)


def test_top1_accuracy_and_entropy_definitions(backend):
    """Accuracy counts kept tokens whose label holds the row maximum; entropy is in nats over kept tokens."""
    hidden = torch.eye(4, 8)
    weight = torch.zeros(6, 8)
    weight[[0, 1, 2, 3], [0, 1, 2, 3]] = 5.0  # token i's largest logit is entry i
    # right, wrong, right, and ignored although right: an ignore_index inside the vocabulary (a pad id)
    labels = torch.tensor([0, 4, 2, 3])
    stats = torch.zeros(NUM_STATS, device=DEVICE)
    linear_cross_entropy(hidden.to(DEVICE), weight.to(DEVICE), labels.to(DEVICE), ignore_index=3, stats=stats)
    assert stats[6].item() == pytest.approx(2 / 3)
    probs = torch.tensor([5.0, 0, 0, 0, 0, 0]).softmax(0)
    assert stats[5].item() == pytest.approx(-(probs * probs.log()).sum().item(), rel=1e-5)
    uniform = torch.zeros(NUM_STATS, device=DEVICE)
    linear_cross_entropy(torch.zeros(3, 8, device=DEVICE), weight.to(DEVICE), labels[:3].to(DEVICE), stats=uniform)
    assert uniform[5].item() == pytest.approx(torch.log(torch.tensor(6.0)).item(), rel=1e-6)
    assert uniform[6].item() == 1.0, "all logits tie at 0: every label holds the maximum"


def test_maximum_late_in_a_long_row(backend):
    """Logits rising along a 2100-entry row: the running maximum moves at every Triton tile and C++
    flush block, so the rescaled softmax sums (entropy, loss, gradient) are exercised."""
    vocab = 2100
    hidden = torch.ones(3, 8)
    weight = torch.linspace(-4, 4, vocab)[:, None].expand(vocab, 8).contiguous() / 8
    labels = torch.tensor([vocab - 1, 5, 1000])
    hidden64, weight64 = leaves(hidden.double(), weight.double())
    oracle, logits64 = model_loss(hidden64, weight64, None, labels)
    stats = torch.zeros(NUM_STATS, device=DEVICE)
    inputs = leaves(hidden, weight)
    loss = linear_cross_entropy(inputs[0], inputs[1], labels.to(DEVICE), stats=stats)
    torch.testing.assert_close(loss.double(), oracle.detach(), rtol=1e-6, atol=0)
    expected = oracle_stats(logits64.detach(), labels)
    torch.testing.assert_close(stats[5:].double().cpu(), expected[5:], rtol=1e-5, atol=0)
    torch.testing.assert_close(grads(loss, inputs)[0].double(), grads(oracle, [hidden64, weight64])[0], rtol=1e-5, atol=1e-7)


def test_all_ignored_gives_zero_loss_and_nan_token_stats(backend):
    hidden, weight, bias, labels = make_inputs(5, 8, 11, torch.float32, seed=5, ignored=range(5))
    op_inputs = leaves(hidden, weight, bias)
    stats = torch.zeros(NUM_STATS, device=DEVICE)
    loss = linear_cross_entropy(op_inputs[0], op_inputs[1], labels.to(DEVICE), bias=op_inputs[2], stats=stats)
    assert loss.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads(loss, op_inputs))
    assert torch.isfinite(stats[:5]).all() and torch.isnan(stats[5:]).all()
    assert linear_cross_entropy(*leaves(hidden, weight), labels.to(DEVICE), reduction="sum").item() == 0.0


def test_empty_token_batch(backend):
    hidden = torch.zeros(0, 8, device=DEVICE, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.long, device=DEVICE)
    stats = torch.zeros(NUM_STATS, device=DEVICE)
    loss = linear_cross_entropy(hidden, torch.randn(5, 8, device=DEVICE), labels, stats=stats)
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.shape == (0, 8)
    assert torch.isnan(stats[[0, 1, 2, 3, 5, 6]]).all() and stats[4] == 0
    assert linear_cross_entropy(hidden, torch.randn(5, 8, device=DEVICE), labels, reduction="none").shape == (0,)


def test_nonfinite_logits_are_counted_and_poison_only_kept_tokens(backend):
    hidden, weight, _, labels = make_inputs(6, 8, 40, torch.float32, seed=6, ignored=[4])
    hidden[1, 0] = float("inf")  # a kept token: its loss, and so the mean, become NaN
    hidden[4, 2] = float("nan")  # an ignored token: excluded from the loss, still counted
    logits = hidden @ weight.T
    stats = torch.zeros(NUM_STATS, device=DEVICE)
    per_token = linear_cross_entropy(hidden.to(DEVICE), weight.to(DEVICE), labels.to(DEVICE), reduction="none",
                                     stats=stats).cpu()
    assert torch.isnan(per_token[1]) and per_token[4] == 0 and torch.isfinite(per_token[[0, 2, 3, 5]]).all()
    expected = logit_stats(logits)
    assert stats[4].item() == expected[4].item() == 80
    torch.testing.assert_close(stats[:4].cpu(), expected[:4], rtol=1e-5, atol=1e-5)
    assert torch.isnan(stats[5]), "a kept token's entropy is NaN"
    kept_rows = hidden.clone()
    kept_rows[1] = 0
    mean = linear_cross_entropy(hidden.to(DEVICE), weight.to(DEVICE), labels.to(DEVICE))
    assert torch.isnan(mean)
    labels_without_1 = labels.clone()
    labels_without_1[1] = IGNORE
    assert torch.isfinite(linear_cross_entropy(hidden.to(DEVICE), weight.to(DEVICE), labels_without_1.to(DEVICE)))


def test_every_output_element_is_written(backend, poisoned_allocations):
    hidden, weight, bias, labels = make_inputs(7, 16, 300, torch.float32, seed=7, ignored=[2])
    op_inputs = leaves(hidden, weight, bias)
    stats = torch.zeros(NUM_STATS, device=DEVICE)
    loss = linear_cross_entropy(op_inputs[0], op_inputs[1], labels.to(DEVICE), bias=op_inputs[2], stats=stats,
                                chunk_size=3)
    assert torch.isfinite(loss) and torch.isfinite(stats).all()
    assert all(torch.isfinite(g).all() for g in grads(loss, op_inputs))
    per_token = linear_cross_entropy(*leaves(hidden, weight), labels.to(DEVICE), reduction="none", chunk_size=3)
    assert torch.isfinite(per_token).all()
    assert poisoned_allocations or backend == "cpp", "the poison was never applied: the test could not fail"


def test_stats_buffer_is_overwritten_and_optional(backend):
    hidden, weight, _, labels = make_inputs(4, 8, 9, torch.float32, seed=8)
    stats = torch.full((NUM_STATS,), 1e30, device=DEVICE)
    args = (hidden.to(DEVICE), weight.to(DEVICE), labels.to(DEVICE))
    with_stats = linear_cross_entropy(*args, stats=stats)
    first = stats.clone()
    linear_cross_entropy(*args, stats=stats)
    assert torch.equal(stats, first) and stats[0].abs() < 10
    assert torch.equal(linear_cross_entropy(*args), with_stats)


def test_only_required_gradients_are_computed(backend, monkeypatch):
    """A frozen head (LoRA): no dweight work; no grad mode: no gradient work at all."""
    calls = []
    real = lce._lce_op
    monkeypatch.setattr(lce, "_lce_op", lambda *args: calls.append(args[8:11]) or real(*args))
    hidden, weight, bias, labels = make_inputs(5, 8, 12, torch.float32, seed=9)
    hidden_leaf = hidden.to(DEVICE).requires_grad_()
    loss = linear_cross_entropy(hidden_leaf, weight.to(DEVICE), labels.to(DEVICE), bias=bias.to(DEVICE))
    loss.backward()
    assert calls[-1] == (True, False, False) and hidden_leaf.grad is not None
    with torch.no_grad():
        linear_cross_entropy(hidden_leaf, weight.to(DEVICE), labels.to(DEVICE))
    assert calls[-1] == (False, False, False)
    outputs = real(hidden.to(DEVICE), weight.to(DEVICE), None, labels.to(DEVICE), IGNORE, "mean", None, False,
                   True, False, False, 4, backend)
    assert outputs[2].shape == hidden.shape and outputs[3].numel() == 0 and outputs[4].numel() == 0


def test_no_tensor_holds_all_logits(backend):
    """The point of the op: with chunks of N/16 tokens no allocation reaches N·V/8 (V = 2048).

    The profiler sees CPU allocations only. N = 512 in chunks of 32; Triton through the interpreter
    runs one program per token, so there N = 64 in chunks of 4 (64 programs, not 512).
    """
    if DEVICE.type != "cpu":
        pytest.skip("torch's profiler reports CPU allocations only; the CUDA run checks values, not memory")
    tokens = 64 if backend == "triton" else 512
    hidden, weight, _, labels = make_inputs(tokens, 16, 2048, torch.float32, seed=10)
    hidden_leaf = hidden.requires_grad_()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        linear_cross_entropy(hidden_leaf, weight, labels, chunk_size=tokens // 16).backward()
    sizes = [event.cpu_memory_usage for event in profile.events() if event.cpu_memory_usage > 0]
    assert sizes, "the profiler saw no allocation: the test could not fail"
    assert max(sizes) < tokens * 2048 * 4 // 8, f"largest allocation {max(sizes)} bytes"


def test_default_chunk_size_follows_vocab_and_hidden_size():
    assert default_chunk_size(576, 49152) == 256  # the real model: 50 MB of fp32 logits per chunk
    assert default_chunk_size(3072, 32064) == 512  # Phi-3.5: 66 MB
    assert default_chunk_size(64, 1000) == 64  # no more logits than the head's weight holds
    assert default_chunk_size(4096, 256000) == 64
    assert default_chunk_size(8, 10) == 16 and default_chunk_size(8192, 1000) == 1024


def test_float64_gradcheck_of_reference():
    hidden, weight, bias, labels = make_inputs(5, 8, 7, torch.float64, seed=11, ignored=[3])
    for reduction in ("mean", "none"):
        def loss(h, w, b):
            return linear_cross_entropy(h, w, labels, bias=b, reduction=reduction, chunk_size=2)
        assert torch.autograd.gradcheck(loss, leaves(hidden, weight, bias), eps=1e-6, atol=1e-7)


def test_opcheck(backend):
    hidden, weight, bias, labels = make_inputs(6, 8, 10, torch.float32, seed=12, ignored=[1])
    hidden, weight, bias = leaves(hidden, weight, bias)
    labels = labels.to(DEVICE)
    for reduction, with_stats, needs in [("mean", True, (True, True, True)), ("none", False, (True, False, False))]:
        args = (hidden, weight, bias, labels, IGNORE, reduction, None, with_stats, *needs, 4, backend)
        torch.library.opcheck(torch.ops.so8t.linear_cross_entropy.default, args)


@pytest.mark.parametrize("compile_backend", ["torch", "cpp"])
def test_compile_fullgraph(monkeypatch, compile_backend):
    from so8t_kernels import _backend

    if _backend.why_unusable(compile_backend, DEVICE) is not None:
        pytest.skip(f"{compile_backend}: {_backend.why_unusable(compile_backend, DEVICE)}")
    monkeypatch.setenv("SO8T_BACKEND", compile_backend)
    hidden, weight, bias, labels = make_inputs(7, 8, 20, torch.float32, seed=13, ignored=[2])
    labels = labels.to(DEVICE)

    def step(h, w, b, stats):
        return linear_cross_entropy(h, w, labels, bias=b, stats=stats, chunk_size=3) * 2.0

    eager_inputs, compiled_inputs = leaves(hidden, weight, bias), leaves(hidden, weight, bias)
    eager_stats, compiled_stats = torch.zeros(NUM_STATS, device=DEVICE), torch.zeros(NUM_STATS, device=DEVICE)
    eager = step(*eager_inputs, eager_stats)
    compiled = torch.compile(step, fullgraph=True)(*compiled_inputs, compiled_stats)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_stats, eager_stats)
    for actual, expected in zip(grads(compiled, compiled_inputs), grads(eager, eager_inputs)):
        torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: linear_cross_entropy(torch.randn(3, 8), torch.randn(5, 7), torch.zeros(3, dtype=torch.long)),
         ValueError, r"hidden has shape \(3, 8\) and weight \(5, 7\); expected \[N, H\] and \[V, H\]"),
        (lambda: linear_cross_entropy(torch.randn(3, 8), torch.randn(5, 8), torch.zeros(4, dtype=torch.long)),
         ValueError, r"labels has shape \(4,\); expected \(3,\)"),
        (lambda: linear_cross_entropy(torch.randn(3, 8), torch.randn(5, 8), torch.zeros(3)),
         TypeError, "labels has dtype float32"),
        (lambda: linear_cross_entropy(torch.randn(3, 8), torch.randn(5, 8).double(), torch.zeros(3, dtype=torch.long)),
         TypeError, "weight has dtype torch.float64, hidden torch.float32"),
        (lambda: linear_cross_entropy(torch.randn(3, 8), torch.randn(5, 8), torch.zeros(3, dtype=torch.long),
                                      reduction="avg"), ValueError, "reduction='avg'; expected one of none, mean, sum"),
        (lambda: linear_cross_entropy(torch.randn(3, 8), torch.randn(5, 8), torch.zeros(3, dtype=torch.long),
                                      stats=torch.zeros(5)), ValueError, r"stats has shape \(5,\); expected \(7,\)"),
        (lambda: linear_cross_entropy(torch.randn(3, 8), torch.randn(5, 8), torch.zeros(3, dtype=torch.long),
                                      bias=torch.zeros(4)), ValueError, r"bias has shape \(4,\)"),
        (lambda: linear_cross_entropy(torch.randn(3, 8), torch.randn(5, 8), torch.zeros(3, dtype=torch.long),
                                      chunk_size=0), ValueError, "chunk_size=0; expected a positive int"),
    ],
)
def test_bad_input_names_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_label_outside_vocabulary_raises_on_cpu_backends_and_is_nan_on_triton(backend):
    """Checking labels costs Triton a host sync, so its kernel writes a NaN loss instead of raising."""
    hidden, weight, labels = torch.randn(3, 8), torch.randn(5, 8), torch.tensor([0, 5, 1])
    if backend == "triton":
        loss = linear_cross_entropy(hidden.to(DEVICE), weight.to(DEVICE), labels.to(DEVICE))
        assert torch.isnan(loss).item()
        return
    with pytest.raises((IndexError, RuntimeError), match=r"outside \[0, 5\)|must lie in \[0, 5\)"):
        linear_cross_entropy(hidden, weight, labels)
