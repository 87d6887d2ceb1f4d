"""``TrainOptions``: everything ``so8t train`` can be told, and the command-line arguments that fill it.

Imports no torch, transformers or peft: ``so8t train --help`` needs none of them.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ALL_INTERMEDIATE, SCHEDULES, SO8TConfig
from ..errors import SO8TError
from ..monitor.config import MonitorConfig

DEFAULT_OUTPUT_DIR = "so8t-output"
TASKS = ("generate", "classify")
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
    max_steps: int = 150
    learning_rate: float = 3e-3
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 256
    gradient_checkpointing: bool = False
    bf16: bool = False
    seed: int = 0
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

    def validate(self) -> None:
        """Checks every value that needs no model; raises SO8TError on the first bad one."""
        positive = dict(max_steps=self.max_steps, batch_size=self.batch_size, grad_accum=self.grad_accum,
                        lora_r=self.lora_r, lora_alpha=self.lora_alpha, max_length=self.max_length)
        for name, value in positive.items():
            if value < 1:
                raise SO8TError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise SO8TError(f"--learning-rate must be positive, got {self.learning_rate}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise SO8TError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if self.gates:
            self.so8t_config()
        output = Path(self.output_dir)
        if output.exists() and not output.is_dir():
            raise SO8TError(f"--output-dir {output} exists and is not a directory")
        if output.is_dir() and any(output.iterdir()) and not self.overwrite:
            raise SO8TError(f"--output-dir {output} already exists and is not empty (pass --overwrite to replace it)")


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
    what.add_argument("--output-dir", default=defaults.output_dir, help="where the adapters go (default: %(default)s)")
    what.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
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
    loop.add_argument("--max-steps", type=int, default=defaults.max_steps, help="optimizer steps (default: %(default)s)")
    loop.add_argument("--learning-rate", type=float,
                      help=f"default: {defaults.learning_rate} (LoRA); {CLASSIFY_LEARNING_RATE} with --task classify, "
                           "which trains the embedded default's every weight")
    loop.add_argument("--batch-size", type=int, default=defaults.batch_size, help="per device (default: %(default)s)")
    loop.add_argument("--grad-accum", type=int, default=defaults.grad_accum, help="micro-batches per optimizer step")
    loop.add_argument("--gradient-checkpointing", action="store_true")
    loop.add_argument("--bf16", action="store_true", help="bf16 weights and compute (4-bit: bf16 compute on GPU)")
    loop.add_argument("--seed", type=int, default=defaults.seed)

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
        max_steps=args.max_steps, learning_rate=_learning_rate(args), batch_size=args.batch_size,
        grad_accum=args.grad_accum, max_length=args.max_length,
        gradient_checkpointing=args.gradient_checkpointing, bf16=args.bf16, seed=args.seed,
        monitor=None if args.no_monitor else MonitorConfig(
            interval=args.monitor_interval, flush_every=args.monitor_flush_every,
            stop_on_nonfinite=args.monitor_stop_on_nonfinite, plots=not args.no_monitor_plots,
        ),
    )
