"""What every benchmark shares: timing, rows, targets, and the registry that ``run.py`` walks.

A benchmark is a function ``(Context) -> list[Row]`` decorated with ``@benchmark``; its module is
named in ``run.SUITES``. A new suite (e.g. ``benchmarks/train_step.py``) is a few lines::

    from harness import GOAL, LOWER_IS_BETTER, Target, TimesReference, benchmark, register_targets

    @benchmark
    def train_step(ctx):
        plain = ctx.row("train step", "step", "no gates", "phi3-tiny b8", "fp32",
                        ctx.time(step_without_gates), kind="baseline")
        gated = ctx.row("train step", "step", "gates", "phi3-tiny b8", "fp32",
                        ctx.time(step_with_gates), references=[plain])
        return [plain, gated]

    register_targets(Target(GOAL, "cpu", "train step", "step", TimesReference("no gates"),
                            LOWER_IS_BETTER, 1.05, impls=("gates",)))

and one line in ``run.DEFAULT_SUITES`` (seconds) or ``run.LONG_SUITES`` (minutes: run only when named).
Rows are compared only against rows measured in the same run.
"""

import contextlib
import os
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    median_ms: float
    q25_ms: float
    q75_ms: float
    min_ms: float  # in the files only: the least disturbed call, for a machine shared with other work
    samples: int  # timed calls

    @property
    def iqr_ms(self) -> float:
        return self.q75_ms - self.q25_ms


@dataclass(frozen=True)
class TimingPlan:
    """How long to time one thing. CPU: warm-up calls, then timed calls until the budget is spent,
    between ``cpu_min_samples`` and ``cpu_max_samples`` of them: the 0.4 s dense baseline gets 3, a
    20 ms op ~75.
    GPU: ``triton.testing.do_bench`` with its warm-up and repetition times in ms."""

    cpu_warmup_calls: int
    cpu_budget_s: float
    cpu_min_samples: int
    cpu_max_samples: int
    gpu_warmup_ms: int
    gpu_rep_ms: int


FULL_PLAN = TimingPlan(cpu_warmup_calls=2, cpu_budget_s=1.5, cpu_min_samples=3, cpu_max_samples=200,
                       gpu_warmup_ms=25, gpu_rep_ms=100)
QUICK_PLAN = TimingPlan(cpu_warmup_calls=1, cpu_budget_s=0.1, cpu_min_samples=3, cpu_max_samples=20,
                        gpu_warmup_ms=5, gpu_rep_ms=20)


def summarize(samples_ms: list[float]) -> Timing:
    if len(samples_ms) == 1:  # do_bench times a call slower than its repetition time once
        return Timing(*samples_ms * 4, 1)
    q25, median, q75 = statistics.quantiles(samples_ms, n=4, method="inclusive")
    return Timing(median, q25, q75, min(samples_ms), len(samples_ms))


def interleaved_step_times(runs: dict[str, tuple], rounds: int) -> dict[str, list[float]]:
    """Per name of ``runs`` (name → (Trainer, a clock callback with ``mean_step_ms``)), one sample per
    round: that run's mean step time (ms). Each round trains every run once, taking turns run by run, so
    a shared machine's changing load hits each configuration alike."""
    mean_step_ms = {name: [] for name in runs}
    for _ in range(rounds):
        for name, (trainer, clock) in runs.items():
            trainer.train()
            mean_step_ms[name].append(clock.mean_step_ms)
    return mean_step_ms


def baseline_and_variant_rows(ctx: "Context", op: str, shape: str, dtype: str, mean_step_ms: dict[str, list[float]],
                              baseline: str, variant: str) -> list:
    """The rows of two interleaved training runs: ``baseline`` and ``variant`` referring to it."""
    plain = ctx.row(op, "step", baseline, shape, dtype, summarize(mean_step_ms[baseline]), kind="baseline")
    return [plain, ctx.row(op, "step", variant, shape, dtype, summarize(mean_step_ms[variant]), references=[plain])]


def time_on_cpu(fn: Callable[[], object], plan: TimingPlan) -> Timing:
    warmup_started = time.perf_counter()
    for _ in range(plan.cpu_warmup_calls):
        fn()
        if time.perf_counter() - warmup_started > plan.cpu_budget_s:
            break  # a call this slow is warm after one run; more would only lengthen the benchmark
    samples_ms = []
    started = time.perf_counter()
    while len(samples_ms) < plan.cpu_min_samples or (
        time.perf_counter() - started < plan.cpu_budget_s and len(samples_ms) < plan.cpu_max_samples
    ):
        call_started = time.perf_counter()
        fn()
        samples_ms.append((time.perf_counter() - call_started) * 1e3)
    return summarize(samples_ms)


def time_on_gpu(fn: Callable[[], object], plan: TimingPlan) -> Timing:
    """CUDA-event times of each call, with the L2 cache flushed before each (do_bench's own doing)."""
    import triton.testing

    samples_ms = triton.testing.do_bench(fn, warmup=plan.gpu_warmup_ms, rep=plan.gpu_rep_ms, return_mode="all")
    return summarize(samples_ms)


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------
KINDS = ("reference", "baseline", "so8t")  # clone/sum · the obvious torch code · so8t's own code


@dataclass
class Row:
    suite: str
    op: str
    pass_: str  # "fwd", "fwd+bwd", "fwd+stats", "-" for references that have no pass, "step", …
    impl: str  # a backend for so8t_kernels rows, else the reference/baseline name ("clone", "einsum", …)
    kind: str
    shape: str
    dtype: str
    timing: Timing
    bytes_moved: int | None  # the traffic an ideal implementation needs (reads + writes), if meaningful
    ratios: dict[str, float] = field(default_factory=dict)  # impl of a reference row → median ÷ its median
    copy_gbps: float | None = None  # bandwidth of the "clone" reference, for % of copy bandwidth

    @property
    def gbps(self) -> float | None:
        return None if self.bytes_moved is None else self.bytes_moved / (self.timing.median_ms * 1e6)

    @property
    def pct_copy(self) -> float | None:
        if self.gbps is None or self.copy_gbps is None:
            return None
        return 100.0 * self.gbps / self.copy_gbps


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


def shape_text(*sizes: int) -> str:
    return "×".join(str(size) for size in sizes)


# ---------------------------------------------------------------------------------------------
# Context: what a benchmark function gets
# ---------------------------------------------------------------------------------------------
BACKEND_ENV = "SO8T_BACKEND"


@dataclass
class Context:
    device: torch.device
    dtypes: list[torch.dtype]
    backends: list[str]  # so8t_kernels backends usable on ``device`` and selected by --backends
    quick: bool
    plan: TimingPlan
    suite: str = ""
    errors: list[str] = field(default_factory=list)

    def time(self, fn: Callable[[], object]) -> Timing:
        return time_on_gpu(fn, self.plan) if self.device.type == "cuda" else time_on_cpu(fn, self.plan)

    def row(self, op, pass_, impl, shape, dtype, timing, *, kind="so8t", bytes_moved=None, references=()):
        """A row whose ratios are against ``references`` (rows of this run); the one named "clone"
        also gives the copy bandwidth for % of copy bandwidth."""
        ratios = {ref.impl: timing.median_ms / ref.timing.median_ms for ref in references}
        clone = next((ref for ref in references if ref.impl == "clone"), None)
        return Row(self.suite, op, pass_, impl, kind, shape, dtype, timing, bytes_moved, ratios,
                   copy_gbps=clone.gbps if clone is not None else None)

    @contextlib.contextmanager
    def backend(self, name: str):
        """Run so8t_kernels ops on backend ``name`` (SO8T_BACKEND is read per call)."""
        previous = os.environ.get(BACKEND_ENV)
        os.environ[BACKEND_ENV] = name
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop(BACKEND_ENV)
            else:
                os.environ[BACKEND_ENV] = previous

    @contextlib.contextmanager
    def recording_errors(self, what: str):
        """A failure inside is recorded (and reported by run.py) instead of ending the run."""
        try:
            yield
        except Exception as error:  # noqa: BLE001 — any failure of one measurement is reported, not fatal
            last = traceback.extract_tb(error.__traceback__)[-1]
            self.errors.append(f"{what}: {type(error).__name__}: {error} ({last.filename}:{last.lineno})")


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------
BenchmarkFn = Callable[[Context], list[Row]]
BENCHMARKS: list[tuple[str, BenchmarkFn]] = []  # (suite module, function), in registration order


def benchmark(fn: BenchmarkFn) -> BenchmarkFn:
    BENCHMARKS.append((fn.__module__, fn))
    return fn


# ---------------------------------------------------------------------------------------------
# Targets: printed next to the measured value, never enforced
# ---------------------------------------------------------------------------------------------
LOWER_IS_BETTER = "≤"
HIGHER_IS_BETTER = "≥"
MINIMUM = "minimum"  # the bar so8t must clear on that device
GOAL = "goal"  # what the project aims for (where it is stricter than the minimum)


@dataclass(frozen=True)
class TimesReference:
    """median ÷ the reference's median (1.3 = 30% slower than the reference)."""

    reference: str

    @property
    def label(self) -> str:
        return f"× {self.reference}"

    def value(self, row: Row) -> float | None:
        return row.ratios.get(self.reference)


@dataclass(frozen=True)
class SpeedupOver:
    """the reference's median ÷ median (10 = ten times faster than the reference)."""

    reference: str

    @property
    def label(self) -> str:
        return f"× faster than {self.reference}"

    def value(self, row: Row) -> float | None:
        ratio = row.ratios.get(self.reference)
        return None if ratio is None else 1.0 / ratio


@dataclass(frozen=True)
class PercentOfCopyBandwidth:
    label: str = "% of copy bandwidth"

    def value(self, row: Row) -> float | None:
        return row.pct_copy


@dataclass(frozen=True)
class Microseconds:
    label: str = "µs"

    def value(self, row: Row) -> float | None:
        return row.timing.median_ms * 1e3


@dataclass(frozen=True)
class Target:
    level: str  # MINIMUM or GOAL
    device: str  # "cpu" or "cuda"
    op: str
    pass_: str
    metric: TimesReference | SpeedupOver | PercentOfCopyBandwidth | Microseconds
    goal: str  # LOWER_IS_BETTER or HIGHER_IS_BETTER
    bound: float
    impls: tuple[str, ...] = ()  # the so8t rows it is about, by impl; () = the best one measured

    def describe(self) -> str:
        return f"{self.op} {self.pass_} {self.metric.label} {self.goal} {self.bound:g}"


TARGETS: list[Target] = []


def register_targets(*targets: Target) -> None:
    TARGETS.extend(targets)


@dataclass(frozen=True)
class TargetResult:
    target: Target
    dtype: str
    impl: str | None  # the so8t row the value came from; None = not measured in this run
    value: float | None

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        if self.target.goal == LOWER_IS_BETTER:
            return self.value <= self.target.bound
        return self.value >= self.target.bound


def evaluate_targets(rows: list[Row], device: str) -> list[TargetResult]:
    """One result per (target for this device, dtype measured for its op and pass), best impl first."""
    results = []
    for target in (t for t in TARGETS if t.device == device):
        candidates = [
            row for row in rows
            if row.kind == "so8t" and row.op == target.op and row.pass_ == target.pass_
            and (not target.impls or row.impl in target.impls) and target.metric.value(row) is not None
        ]
        if not candidates:
            results.append(TargetResult(target, "-", None, None))
        for dtype in dict.fromkeys(row.dtype for row in candidates):
            values = [(target.metric.value(row), row.impl) for row in candidates if row.dtype == dtype]
            value, impl = (min if target.goal == LOWER_IS_BETTER else max)(values)
            results.append(TargetResult(target, dtype, impl, value))
    return results
