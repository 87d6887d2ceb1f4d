"""The ops' contract around the math: backend choice, bad input, torch.library registration, compile."""

import subprocess
import sys
import warnings

import pytest
import torch
from ops_helpers import DEVICE, backend  # noqa: F401  (fixture)

from so8t_kernels import _backend, logit_stats, so8_exp, so8_rotate


def rotate_args(hidden=24, tokens=3):
    return torch.randn(tokens, hidden), torch.linalg.matrix_exp(torch.zeros(hidden // 8, 8, 8)), torch.tensor(0.0)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: so8_exp(torch.randn(3, 27)), ValueError, r"theta has shape \(3, 27\); expected \[\.\.\., 28\]"),
        (lambda: so8_exp(torch.tensor(1.0)), ValueError, "theta has shape"),
        (lambda: so8_exp(torch.ones(3, 28, dtype=torch.int64)), TypeError, "theta has dtype int64"),
        (lambda: so8_exp([0.0] * 28), TypeError, "theta must be a torch.Tensor"),
        (lambda: so8_rotate(torch.randn(3, 12), torch.randn(1, 8, 8), torch.tensor(0.0)), ValueError,
         r"x has shape \(3, 12\); its last dimension \(hidden size\) must be a positive multiple of 8"),
        (lambda: so8_rotate(torch.randn(3, 16), torch.randn(1, 8, 8), torch.tensor(0.0)), ValueError,
         r"rotation has shape \(1, 8, 8\); expected \(2, 8, 8\)"),
        (lambda: so8_rotate(torch.randn(3, 16), torch.randn(2, 8, 7), torch.tensor(0.0)), ValueError,
         "rotation has shape"),
        (lambda: so8_rotate(torch.randn(3, 16), torch.randn(2, 8, 8), torch.tensor([0.0])), ValueError,
         r"alpha has shape \(1,\); expected a 0-d tensor"),
        (lambda: so8_rotate(torch.ones(3, 16, dtype=torch.int32), torch.randn(2, 8, 8), torch.tensor(0.0)), TypeError,
         "x has dtype int32"),
        (lambda: so8_rotate(*rotate_args(), stats=torch.zeros(3, dtype=torch.float64)), TypeError, "stats has dtype"),
        (lambda: so8_rotate(*rotate_args(), stats=torch.zeros(4)), ValueError, r"stats has shape \(4,\)"),
        (lambda: so8_rotate(torch.randn(3, 16), torch.randn(2, 8, 8, device="meta"), torch.tensor(0.0)), ValueError,
         "tensors must be on one device, got x on cpu, rotation on meta"),
        (lambda: logit_stats(torch.ones(4, dtype=torch.int32)), TypeError, "logits has dtype int32"),
    ],
)
def test_bad_input_names_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_unknown_backend_name_raises(monkeypatch):
    monkeypatch.setenv("SO8T_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="SO8T_BACKEND='cuda-magic' is not one of"):
        so8_exp(torch.zeros(1, 28))


def test_explicit_backend_that_cannot_run_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("SO8T_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="SO8T_BACKEND=triton cannot run so8_exp on cpu"):
        so8_exp(torch.zeros(1, 28))


def test_auto_falls_back_with_one_warning(monkeypatch):
    """A CPU tensor without the C++ extension: auto picks torch and says so once per op and reason."""
    monkeypatch.setattr(_backend, "_warned", set())
    monkeypatch.setattr(_backend, "why_unusable", lambda backend, device: None if backend == "torch" else "not here")
    monkeypatch.delenv("SO8T_BACKEND", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            so8_exp(torch.zeros(2, 28))
            logit_stats(torch.zeros(4))
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert messages == [
        "so8t: so8_exp falls back to the PyTorch backend: not here",
        "so8t: logit_stats falls back to the PyTorch backend: not here",
    ]


def test_auto_prefers_triton_on_cuda_and_cpp_on_cpu():
    assert _backend.preferred_backend(torch.device("cuda")) == "triton"
    assert _backend.preferred_backend(torch.device("cpu")) == "cpp"


def test_import_does_not_touch_cuda():
    code = (
        "import torch, unittest.mock as m\n"
        "with m.patch.object(torch.cuda, 'is_available', side_effect=AssertionError('CUDA queried')), "
        "m.patch.object(torch.cuda, 'device_count', side_effect=AssertionError('CUDA queried')):\n"
        "    import so8t_kernels\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_info_reports_every_backend_and_op():
    result = subprocess.run(
        [sys.executable, "-m", "so8t_kernels.info"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    for word in ("torch", "triton", "cpp", "so8_exp", "so8_rotate", "logit_stats", "cpu tensors"):
        assert word in result.stdout


def test_opcheck(backend):
    generator = torch.Generator().manual_seed(0)
    theta = torch.randn(5, 28, generator=generator, device="cpu").to(DEVICE).requires_grad_()
    torch.library.opcheck(torch.ops.so8t.so8_exp.default, (theta, backend))
    x = torch.randn(2, 3, 24, generator=generator).to(DEVICE).requires_grad_()
    rotation = torch.linalg.matrix_exp(torch.randn(3, 8, 8, generator=generator) * 0.1).to(DEVICE).requires_grad_()
    alpha = torch.tensor(0.3, device=DEVICE, requires_grad=True)
    for with_stats in (False, True):
        torch.library.opcheck(torch.ops.so8t.so8_rotate.default, (x, rotation, alpha, with_stats, backend))
    torch.library.opcheck(torch.ops.so8t.logit_stats.default, (torch.randn(4, 33, device=DEVICE), backend))


def test_compile_fullgraph_on_torch_backend(monkeypatch):
    monkeypatch.setenv("SO8T_BACKEND", "torch")

    def gated_layer(theta, x, alpha, stats):
        rotation, residual = so8_exp(theta)
        y = so8_rotate(x, rotation, alpha, stats=stats)
        return y.square().mean() + residual.sum(), logit_stats(y)

    generator = torch.Generator().manual_seed(1)
    theta = (torch.randn(3, 28, generator=generator) * 0.5).to(DEVICE).requires_grad_()
    alpha = torch.tensor(-1.0, device=DEVICE, requires_grad=True)
    x = torch.randn(2, 5, 24, generator=generator).to(DEVICE)
    eager_stats, compiled_stats = torch.zeros(3, device=DEVICE), torch.zeros(3, device=DEVICE)
    eager_loss, eager_logit_stats = gated_layer(theta, x, alpha, eager_stats)
    eager_grads = torch.autograd.grad(eager_loss, (theta, alpha))
    compiled = torch.compile(gated_layer, fullgraph=True)
    loss, compiled_logit_stats = compiled(theta, x, alpha, compiled_stats)
    grads = torch.autograd.grad(loss, (theta, alpha))
    assert torch.allclose(loss, eager_loss) and torch.allclose(compiled_logit_stats, eager_logit_stats)
    assert torch.equal(compiled_stats, eager_stats) and compiled_stats[0] > 0
    for grad, expected in zip(grads, eager_grads):
        assert torch.allclose(grad, expected, atol=1e-6)
