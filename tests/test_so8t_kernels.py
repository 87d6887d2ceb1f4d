"""The ops' contract around the math: backend choice (and auto's fallback when a Triton kernel fails),
bad input, torch.library registration, compile, and running without Triton installed."""

import importlib
import os
import subprocess
import sys
import warnings

import pytest
import torch
from ops_helpers import DEVICE, backend, with_backend  # noqa: F401  (fixture)

from so8t_kernels import _backend, linear_cross_entropy, logit_stats, so8_exp, so8_rotate
from so8t_kernels._triton import TRITON_VERSION


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


def test_ops_run_without_triton_installed():
    """A CPU-only install without Triton: the package imports (the kernels stay plain functions) and
    the ops run on the C++ or PyTorch backend."""
    code = (
        "import sys, warnings\n"
        "sys.modules['triton'] = None  # `import triton` raises ImportError, as where it is not installed\n"
        "import torch\n"
        "from so8t_kernels import _backend, logit_stats, so8_exp, so8_rotate\n"
        "assert 'triton is not importable' in _backend.why_unusable('triton', torch.device('cpu'))\n"
        "warnings.simplefilter('ignore')\n"
        "rotation, _ = so8_exp(torch.zeros(3, 28))\n"
        "y = so8_rotate(torch.ones(2, 24), rotation, torch.tensor(0.0))\n"
        "print(float(y.sum()), float(logit_stats(y)[0]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["48.0", "1.0"]


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


# --------------------------------------------------------------------------------------------------
# The Triton safety net of SO8T_BACKEND=auto: a kernel that fails to compile or launch on a GPU
# --------------------------------------------------------------------------------------------------
FORCED_FAILURE = "PTXAS error: Internal Triton PTX codegen error (forced by the test)"


def _exp_case():
    generator = torch.Generator().manual_seed(5)
    theta = (torch.randn(5, 28, generator=generator) * 0.5).to(DEVICE).requires_grad_()
    grad_rotation = torch.randn(5, 8, 8, generator=generator).to(DEVICE)  # dL/dR not depending on R
    rotation, residual = so8_exp(theta)
    rotation.backward(grad_rotation)
    return [rotation, residual, theta.grad]


def _rotate_case():
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(3, 24, generator=generator).to(DEVICE).requires_grad_()
    rotation = torch.linalg.matrix_exp(torch.randn(3, 8, 8, generator=generator) * 0.1).to(DEVICE).requires_grad_()
    alpha = torch.tensor(0.3, device=DEVICE, requires_grad=True)
    stats = torch.zeros(3, device=DEVICE)
    y = so8_rotate(x, rotation, alpha, stats=stats)
    y.square().sum().backward()
    return [y, stats, x.grad, rotation.grad, alpha.grad]


def _logit_stats_case():
    return [logit_stats(torch.randn(7, 33, generator=torch.Generator().manual_seed(7)).to(DEVICE))]


def _linear_cross_entropy_case():
    generator = torch.Generator().manual_seed(8)
    hidden = torch.randn(5, 16, generator=generator).to(DEVICE).requires_grad_()
    weight = torch.randn(40, 16, generator=generator).to(DEVICE).requires_grad_()
    labels = torch.randint(0, 40, (5,), generator=generator).to(DEVICE)
    stats = torch.zeros(7, device=DEVICE)
    loss = linear_cross_entropy(hidden, weight, labels, stats=stats)
    loss.backward()
    return [loss, stats, hidden.grad, weight.grad]


OP_CASES = {"so8_exp": _exp_case, "so8_rotate": _rotate_case, "logit_stats": _logit_stats_case,
            "linear_cross_entropy": _linear_cross_entropy_case}


@pytest.fixture
def failing_triton_kernels(monkeypatch):
    """SO8T_BACKEND=auto choosing Triton, as it does for CUDA tensors, and a set of kernel names whose
    launch raises as a failed compile does; yields that set (empty: all fail) and the launches tried."""
    monkeypatch.setattr(_backend, "_warned", set())
    monkeypatch.setattr(_backend, "_triton_failures", {})
    monkeypatch.setattr(_backend, "preferred_backend", lambda device: "triton")
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    failing, launched = set(), []
    kernel_type = type(importlib.import_module("so8t_kernels.so8_exp")._exp_forward_kernel)
    launch = kernel_type.run

    def run(self, *args, **kwargs):
        launched.append(self.__name__)
        if not failing or self.__name__ in failing:
            raise RuntimeError(FORCED_FAILURE)
        return launch(self, *args, **kwargs)

    monkeypatch.setattr(kernel_type, "run", run)
    return failing, launched


def _recorded(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        values = fn()
    # so8t's own warnings only: the interpreter's numpy may warn about log2(0) for θ = 0 padding.
    return values, [str(w.message) for w in caught if str(w.message).startswith("so8t:")]


def _assert_identical(actual, expected, what):
    for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert torch.equal(a, e), f"{what}: output {index} differs from the PyTorch backend's"


@pytest.mark.parametrize("op", OP_CASES)
def test_auto_falls_back_once_when_a_triton_kernel_fails_to_compile(op, failing_triton_kernels):
    """Every kernel of the op fails: the reference gives the same bits as SO8T_BACKEND=torch, with one
    warning naming the op, the Triton version and the error; later calls do not try Triton again."""
    _, launched = failing_triton_kernels
    expected = with_backend("torch", OP_CASES[op])
    actual, messages = _recorded(OP_CASES[op])
    assert launched, "auto never tried the Triton kernels"
    _assert_identical(actual, expected, op)
    assert len(messages) == 1, messages
    assert messages[0].startswith(f"so8t: {op} falls back to the PyTorch backend: ")
    assert f"triton {TRITON_VERSION}" in messages[0] and FORCED_FAILURE in messages[0], messages[0]

    tried = len(launched)
    again, messages = _recorded(OP_CASES[op])
    _assert_identical(again, expected, op)
    assert messages == [] and len(launched) == tried, "a second call warned again or retried Triton"


def test_a_failing_backward_kernel_falls_back_after_a_working_forward(failing_triton_kernels):
    failing, launched = failing_triton_kernels
    failing.add("_exp_backward_kernel")
    expected = with_backend("torch", _exp_case)
    (rotation, residual, grad), messages = _recorded(_exp_case)
    assert launched == ["_exp_forward_kernel", "_exp_backward_kernel"], launched
    # The forward ran on Triton (fp32 roundings apart from the reference), the gradient on the reference.
    assert torch.allclose(rotation, expected[0], atol=1e-6) and torch.equal(grad, expected[2])
    assert len(messages) == 1 and "so8_exp" in messages[0] and FORCED_FAILURE in messages[0], messages
    _recorded(_exp_case)
    assert len(launched) == 2, "after its backward failed, so8_exp still launched Triton kernels"


def test_explicit_triton_raises_the_kernel_failure(failing_triton_kernels, monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "triton")
    for case in OP_CASES.values():
        with pytest.raises(RuntimeError, match="forced by the test"):
            case()


def test_auto_falls_back_when_the_real_triton_cannot_launch():
    """Triton compiled, not interpreted, with no GPU driver: the launch itself fails ("0 active
    drivers"), a real Triton error; auto is made to prefer Triton as it does for a CUDA tensor."""
    code = (
        "import warnings, torch, triton\n"
        "from so8t_kernels import _backend, so8_exp\n"
        "from so8t_kernels.so8_exp import exp_reference\n"
        "_backend.preferred_backend = lambda device: 'triton'\n"
        "_backend.why_unusable = lambda backend, device: None\n"
        "theta = torch.randn(4, 28)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    rotation, _ = so8_exp(theta)\n"
        "assert torch.equal(rotation, exp_reference(theta)[0])\n"
        "print(triton.__version__)\n"
        "print('\\n'.join(str(w.message) for w in caught))\n"
    )
    environment = {key: value for key, value in os.environ.items() if key not in ("TRITON_INTERPRET", _backend.ENV_VAR)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    version, *messages = result.stdout.strip().splitlines()
    assert len(messages) == 1, messages
    assert messages[0].startswith("so8t: so8_exp falls back to the PyTorch backend: ") and f"triton {version}" in messages[0]
