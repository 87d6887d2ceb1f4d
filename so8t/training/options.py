"""``TrainOptions``: everything ``so8t train`` can be told, and the command-line arguments that fill it.

Imports no torch, transformers or peft: ``so8t train --help`` needs none of them.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SO8TError
from ..gates.config import ALL_INTERMEDIATE, SCHEDULES, SO8TConfig
from ..monitor.config import MonitorConfig
from .outputs import check_output_dir

DEFAULT_OUTPUT_DIR = "so8t-output"
TASKS = ("generate", "classify")
LR_SCHEDULERS = ("constant", "linear", "cosine")
REPORT_TO = ("none", "tensorboard", "wandb", "mlflow")
DEFAULT_MAX_STEPS = 150
# Trains the embedded judge's every weight from scratch: 3e-3 (right for LoRA) reached 74% on the
# bundled safety data in 150 steps, 1e-3 reached 99%.
CLASSIFY_LEARNING_RATE = 1e-3
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


@dataclass
class TrainOptions:
    """Everything ``so8t train`` can be told; the defaults are the embedded demo run."""

    model: str | None = None  # hub id, local directory or .gguf file; None: the embedded tiny Phi-3
    data: str | None = None  # JSONL file; None: the bundled dataset of the task
    output_dir: str = DEFAULT_OUTPUT_DIR
    overwrite: bool = False
    load_in_4bit: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: list[str] | None = None  # None: LORA_TARGETS for the architecture
    gates: bool = True  # False: the same LoRA run without SO8T gates, for comparisons
    so8t_layers: list[int] | None = None  # None: all intermediate layers
    alpha_init: float = -5.0
    alpha_target: float = 0.1
    warmup_steps: int = 40
    schedule: str = "linear"
    theta_init_std: float = 0.0
    max_steps: int = DEFAULT_MAX_STEPS
    num_epochs: float | None = None  # given: decides the length instead of max_steps
    learning_rate: float = 3e-3
    lr_scheduler: str = "constant"
    lr_warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 256
    gradient_checkpointing: bool = False
    fused_loss: bool = True  # causal LM: the loss from so8t.models.fused_loss, no logits tensor (--no-fused-loss)
    bf16: bool = False
    seed: int = 0
    save_steps: int = 500  # 0: no checkpoints
    save_total_limit: int = 2  # 0: keep every checkpoint
    resume: str | None = None  # "latest" or a checkpoint directory
    keep_sigint_ignored: bool = False  # started with SIGINT ignored (`so8t train … &` in a script): keep ignoring it
    eval_data: str | None = None
    eval_fraction: float = 0.0
    eval_steps: int | None = None  # None: as often as the training loss is logged
    report_to: str = "none"
    monitor: MonitorConfig | None = field(default_factory=MonitorConfig)  # None: --no-monitor
    extra_callbacks: list = field(default_factory=list)

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
        """Checks every value that needs no model; raises SO8TError on the first bad one."""
        positive = dict(max_steps=self.max_steps, batch_size=self.batch_size, grad_accum=self.grad_accum,
                        lora_r=self.lora_r, lora_alpha=self.lora_alpha, max_length=self.max_length,
                        eval_steps=1 if self.eval_steps is None else self.eval_steps)
        for name, value in positive.items():
            if value < 1:
                raise SO8TError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        for name in ("save_steps", "save_total_limit"):
            if getattr(self, name) < 0:
                raise SO8TError(f"--{name.replace('_', '-')} must be at least 0, got {getattr(self, name)}")
        if self.num_epochs is not None and not (self.num_epochs > 0 and math.isfinite(self.num_epochs)):
            raise SO8TError(f"--num-epochs must be positive, got {self.num_epochs}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise SO8TError(f"--learning-rate must be positive, got {self.learning_rate}")
        fractions = {"--lora-dropout": self.lora_dropout, "--lr-warmup-ratio": self.lr_warmup_ratio,
                     "--eval-fraction": self.eval_fraction}
        for flag, value in fractions.items():
            if not 0.0 <= value < 1.0:
                raise SO8TError(f"{flag} must be in [0, 1), got {value}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise SO8TError(f"--weight-decay must be at least 0, got {self.weight_decay}")
        if not (self.max_grad_norm >= 0 and math.isfinite(self.max_grad_norm)):
            raise SO8TError(f"--max-grad-norm must be at least 0 (0: no clipping), got {self.max_grad_norm}")
        if self.eval_data is not None and self.eval_fraction > 0:
            raise SO8TError("give either --eval-data or --eval-fraction, not both")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise SO8TError(f"--lr-scheduler must be one of {', '.join(LR_SCHEDULERS)}, got {self.lr_scheduler!r}")
        if self.report_to not in REPORT_TO:
            raise SO8TError(f"--report-to must be one of {', '.join(REPORT_TO)}, got {self.report_to!r}")
        if self.report_to != "none" and importlib.util.find_spec(self.report_to) is None:
            raise SO8TError(f"--report-to {self.report_to}: the {self.report_to} package is not installed")
        if self.gates:
            self.so8t_config()
        output_dir = Path(self.output_dir).resolve()
        check_output_dir(output_dir, overwrite=self.overwrite, resume=self.resume is not None)
        if self.resume is not None:
            from .checkpoints import find_checkpoint  # torch: only when resuming, right before the model loads

            find_checkpoint(output_dir, self.resume)

    @property
    def evaluates(self) -> bool:
        return self.eval_data is not None or self.eval_fraction > 0


def _layer_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices like 3,7,11, got {text!r}") from None


def _name_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TrainOptions()
    what = parser.add_argument_group("model and data")
    what.add_argument("--task", choices=TASKS, default="generate",
                      help="generate: fine-tune a causal LM; classify: train the safety judge (ALLOW/ESCALATE/DENY) "
                           "(default: %(default)s)")
    what.add_argument("--model", help="hub id, local directory, or a .gguf file (converted once into a model "
                                        "directory cached under $SO8T_CACHE_DIR or ~/.cache/so8t) (default: the "
                                        "embedded tiny Phi-3, no download)")
    what.add_argument("--data", help="JSONL with `text`, `messages`, or `prompt`/`thinking`/`answer` rows "
                                     "(default: the bundled thinking dataset); with --task classify, "
                                     "`text`/`label` rows (default: the bundled safety dataset)")
    what.add_argument("--eval-data", help="held-out JSONL in the format of --data: eval loss and perplexity before "
                                          "training, every --eval-steps and at the end")
    what.add_argument("--eval-fraction", type=float, default=defaults.eval_fraction,
                      help="hold out this fraction of --data for the eval instead (split by --seed)")
    what.add_argument("--output-dir", default=defaults.output_dir,
                      help="the run's directory: final adapters, checkpoint-<step>/, monitoring/ "
                           "(default: %(default)s)")
    what.add_argument("--overwrite", action="store_true",
                      help="replace a non-empty --output-dir (its adapters stay until this run publishes its own)")
    what.add_argument("--max-length", type=int, default=defaults.max_length, help="tokens per example (default: %(default)s)")

    lora = parser.add_argument_group("QLoRA")
    lora.add_argument("--load-in-4bit", action="store_true", help="NF4 base weights with double quantization (bitsandbytes)")
    lora.add_argument("--lora-r", type=int, default=defaults.lora_r)
    lora.add_argument("--lora-alpha", type=int, default=defaults.lora_alpha)
    lora.add_argument("--lora-dropout", type=float, default=defaults.lora_dropout)
    lora.add_argument("--lora-targets", type=_name_list,
                      help="comma-separated module names (default per architecture; Phi-3: "
                           f"{','.join(LORA_TARGETS['phi3'])})")

    gates = parser.add_argument_group("SO8T gates")
    placement = gates.add_mutually_exclusive_group()
    placement.add_argument("--place-so8t-in-all-intermediate", action="store_true",
                           help="gate decoder layers 1 … L−2 (the default)")
    placement.add_argument("--so8t-layers", type=_layer_list, help="gate these 0-based layers instead, e.g. 3,7,11")
    placement.add_argument("--no-so8t", action="store_true", help="train the same LoRA setup without gates (a baseline)")
    gates.add_argument("--alpha-init", type=float, default=defaults.alpha_init, help="α at step 0 (default: %(default)s)")
    gates.add_argument("--alpha-target", type=float, default=defaults.alpha_target,
                       help="gate activation σ(α) at the end of warmup (default: %(default)s)")
    gates.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps,
                       help="optimizer steps of α annealing (default: %(default)s)")
    gates.add_argument("--schedule", choices=SCHEDULES, default=defaults.schedule, help="α warmup shape (default: %(default)s)")
    gates.add_argument("--theta-init-std", type=float, default=defaults.theta_init_std,
                       help="initial θ std; 0 starts every gate as the identity (default: %(default)s)")

    loop = parser.add_argument_group("training")
    length = loop.add_mutually_exclusive_group()
    length.add_argument("--max-steps", type=int, help=f"optimizer steps (default: {DEFAULT_MAX_STEPS})")
    length.add_argument("--num-epochs", type=float, help="passes over the training data, instead of --max-steps")
    loop.add_argument("--learning-rate", type=float,
                      help=f"default: {defaults.learning_rate} (LoRA); {CLASSIFY_LEARNING_RATE} with --task classify, "
                           "which trains the embedded default's every weight")
    loop.add_argument("--lr-scheduler", choices=LR_SCHEDULERS, default=defaults.lr_scheduler,
                      help="learning-rate decay after the warmup (default: %(default)s)")
    loop.add_argument("--lr-warmup-ratio", type=float, default=defaults.lr_warmup_ratio,
                      help="fraction of the steps with a linear learning-rate warmup from 0 (default: %(default)s)")
    loop.add_argument("--weight-decay", type=float, default=defaults.weight_decay,
                      help="AdamW weight decay (default: %(default)s)")
    loop.add_argument("--max-grad-norm", type=float, default=defaults.max_grad_norm,
                      help="clip the gradient norm to this; 0: no clipping (default: %(default)s)")
    loop.add_argument("--batch-size", type=int, default=defaults.batch_size, help="per device (default: %(default)s)")
    loop.add_argument("--grad-accum", type=int, default=defaults.grad_accum, help="micro-batches per optimizer step")
    loop.add_argument("--gradient-checkpointing", action="store_true")
    loop.add_argument("--no-fused-loss", action="store_true",
                      help="--task generate: compute the loss from the model's full logits tensor (its own loss) "
                           "instead of the chunked linear cross-entropy, which never materialises the logits")
    loop.add_argument("--bf16", action="store_true", help="bf16 weights and compute (4-bit: bf16 compute on GPU)")
    loop.add_argument("--seed", type=int, default=defaults.seed)
    loop.add_argument("--eval-steps", type=int,
                      help="evaluate every N optimizer steps (default: as often as the loss is logged, 10 times a run)")
    loop.add_argument("--report-to", choices=REPORT_TO, default=defaults.report_to,
                      help="also send the logs (loss, eval loss, so8t/* scalars) to this tracker "
                           "(default: %(default)s)")

    saving = parser.add_argument_group("checkpoints (<output-dir>/checkpoint-<step>/)")
    saving.add_argument("--save-steps", type=int, default=defaults.save_steps,
                        help="save a checkpoint every N optimizer steps and at the end; 0: none (SIGTERM and SIGINT still save "
                             "one of the last step) (default: %(default)s)")
    saving.add_argument("--save-total-limit", type=int, default=defaults.save_total_limit,
                        help="keep the newest K checkpoints; 0: all (default: %(default)s)")
    saving.add_argument("--resume", nargs="?", const="latest", metavar="latest|DIR",
                        help="continue the run in --output-dir from its newest checkpoint, or from checkpoint DIR")
    saving.add_argument("--keep-sigint-ignored", action="store_true",
                        help="SIGTERM and SIGINT stop training after the current step with a checkpoint, also when "
                             "SIGINT was ignored at start (a background job of a script: so8t train … &); with this, "
                             "SIGINT stays ignored then")

    monitoring = parser.add_argument_group("monitoring (files in <output-dir>/monitoring; see `so8t report`)")
    monitoring.add_argument("--no-monitor", action="store_true", help="train without the SO8T monitor")
    monitoring.add_argument("--monitor-interval", type=int, default=MonitorConfig.interval,
                            help="sample every N optimizer steps (default: %(default)s)")
    monitoring.add_argument("--monitor-flush-every", type=int, default=MonitorConfig.flush_every,
                            help="fsync and rewrite time series and plots every N samples (default: %(default)s)")
    monitoring.add_argument("--monitor-stop-on-nonfinite", action="store_true",
                            help="stop training at the first non-finite logit, activation, parameter or gradient")
    monitoring.add_argument("--no-monitor-plots", action="store_true", help="record without drawing plots")


def _learning_rate(args: argparse.Namespace) -> float:
    if args.learning_rate is not None:
        return args.learning_rate
    return CLASSIFY_LEARNING_RATE if args.task == "classify" else TrainOptions.learning_rate


def options_from_args(args: argparse.Namespace) -> TrainOptions:
    return TrainOptions(
        model=args.model, data=args.data, output_dir=args.output_dir, overwrite=args.overwrite,
        load_in_4bit=args.load_in_4bit, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout, lora_targets=args.lora_targets, gates=not args.no_so8t,
        so8t_layers=args.so8t_layers, alpha_init=args.alpha_init, alpha_target=args.alpha_target,
        warmup_steps=args.warmup_steps, schedule=args.schedule, theta_init_std=args.theta_init_std,
        max_steps=DEFAULT_MAX_STEPS if args.max_steps is None else args.max_steps, num_epochs=args.num_epochs,
        learning_rate=_learning_rate(args),
        lr_scheduler=args.lr_scheduler, lr_warmup_ratio=args.lr_warmup_ratio, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm, batch_size=args.batch_size, grad_accum=args.grad_accum,
        max_length=args.max_length, gradient_checkpointing=args.gradient_checkpointing,
        fused_loss=not args.no_fused_loss, bf16=args.bf16,
        seed=args.seed, save_steps=args.save_steps, save_total_limit=args.save_total_limit, resume=args.resume,
        keep_sigint_ignored=args.keep_sigint_ignored,
        eval_data=args.eval_data, eval_fraction=args.eval_fraction, eval_steps=args.eval_steps,
        report_to=args.report_to,
        monitor=None if args.no_monitor else MonitorConfig(
            interval=args.monitor_interval, flush_every=args.monitor_flush_every,
            stop_on_nonfinite=args.monitor_stop_on_nonfinite, plots=not args.no_monitor_plots,
        ),
    )
