"""``so8t train`` (also ``python -m so8t.train``): QLoRA fine-tuning with SO(8) gates on the intermediate
decoder layers, with the HF Trainer and peft LoRA.

With no arguments it trains the embedded default (a small Phi-3-architecture model from a config, a
byte-level tokenizer, the bundled thinking dataset) on CPU in well under a minute, downloading nothing.
Everything is written into a staging directory next to ``--output-dir`` and renamed into place at the
end, so a failed run leaves no half-written output. Multi-process runs (torchrun/accelerate) are the
Trainer's: gate gradients are all-reduced with the rest, so every rank holds the same gates.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    Trainer,
    TrainingArguments,
)

from .adapter import SO8T_ADAPTER_DIR, save_so8t_adapter
from .annealing import AlphaAnnealingCallback
from .config import ALL_INTERMEDIATE, SCHEDULES, SO8TConfig
from .dataset import PaddingCollator, TokenizedDataset, bundled_dataset_path, read_jsonl
from .demo import build_demo_tokenizer, demo_model_config
from .errors import SO8TError
from .monitor.config import MonitorConfig
from .placement import SO8THandle, attach_so8t, find_decoder_layout, resolve_layer_indices

DEFAULT_OUTPUT_DIR = "so8t-output"
TASKS = ("generate", "classify")
# Trains the embedded judge's every weight from scratch: 3e-3 (right for LoRA) reached 74% on the
# bundled safety data in 150 steps, 1e-3 reached 99%.
CLASSIFY_LEARNING_RATE = 1e-3
# Written for a run on the embedded demo base, which has no checkpoint of its own: the seed that
# rebuilds its exact weights, so `so8t serve --adapter DIR` serves the base the adapter was trained on.
EMBEDDED_BASE_FILE = "embedded_base.json"
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

    model: str | None = None  # hub id or local directory; None: the embedded tiny Phi-3
    data: str | None = None  # JSONL file; None: the bundled thinking dataset
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


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
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
                      help="generate: fine-tune a causal LM; classify: train the safety judge (ALLOW/ESCALATE/DENY, "
                           "see so8t.classify) (default: %(default)s)")
    what.add_argument("--model", help="hub id or local directory (default: the embedded tiny Phi-3, no download)")
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


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
def _quantization_config():
    # bitsandbytes computes in fp32 on CPU; bf16 is the fast (and documented) compute dtype on GPU.
    compute_dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def _device_map():
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return "cpu"


def _model_dtype(options: TrainOptions) -> torch.dtype:
    return torch.bfloat16 if options.bf16 else torch.float32


def _from_pretrained(source: str, options: TrainOptions):
    kwargs = {"dtype": _model_dtype(options)}
    if options.load_in_4bit:
        kwargs.update(quantization_config=_quantization_config(), device_map=_device_map())
    return AutoModelForCausalLM.from_pretrained(source, **kwargs)


def load_model_and_tokenizer(options: TrainOptions, demo_overrides: dict | None = None):
    """The base model and its tokenizer: ``--model``, or the embedded demo (``demo_overrides`` change its
    Phi3Config, e.g. to Phi-3-mini shapes for a benchmark). Runs no forward (see ENVIRONMENT.md: an
    inference forward of a 4-bit model on CPU breaks its gradients)."""
    if options.model is None:
        tokenizer = build_demo_tokenizer()
        torch.manual_seed(options.seed)
        config = demo_model_config(tokenizer, **(demo_overrides or {}))
        # Built in its final dtype: at Phi-3-mini shapes an fp32 copy first would be 15 GB.
        model = AutoModelForCausalLM.from_config(config, dtype=_model_dtype(options))
        if options.load_in_4bit:  # bitsandbytes quantizes while loading: go through a checkpoint
            with tempfile.TemporaryDirectory() as checkpoint:
                model.save_pretrained(checkpoint)
                model = _from_pretrained(checkpoint, options)
        return model, tokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(options.model)
        model = _from_pretrained(options.model, options)
    except (OSError, ValueError) as error:
        raise SO8TError(f"cannot load --model {options.model}: {error}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _lora_targets(options: TrainOptions, model) -> list[str] | str:
    if not options.lora_targets:
        return LORA_TARGETS.get(getattr(model.config, "model_type", ""), "all-linear")
    # peft only fails when no name matches at all; a typo next to a valid name would go unnoticed.
    module_names = {name.rpartition(".")[2] for name, _ in model.named_modules()}
    unknown = [target for target in options.lora_targets if target not in module_names]
    if unknown:
        raise SO8TError(f"--lora-targets {','.join(unknown)}: no module of that name in the model")
    return options.lora_targets


def prepare_peft_model(options: TrainOptions, model):
    """4-bit preparation, gradient checkpointing and LoRA, in the order peft requires."""
    # Non-reentrant checkpointing needs no input-grad hook and is the transformers 5 default.
    checkpointing_kwargs = {"use_reentrant": False}
    if options.load_in_4bit:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=options.gradient_checkpointing,
            gradient_checkpointing_kwargs=checkpointing_kwargs,
        )
    elif options.gradient_checkpointing:
        model.activation_checkpointing_enable(checkpointing_kwargs)
    lora = LoraConfig(r=options.lora_r, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                      target_modules=_lora_targets(options, model), task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


# ---------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------
@dataclass
class Training:
    """A ready-to-run training: ``trainer.train()`` runs it; ``handle`` is None for a run without gates."""

    trainer: Trainer
    model: torch.nn.Module
    tokenizer: object
    handle: SO8THandle | None
    options: TrainOptions


def build_callbacks(options: TrainOptions, handle: SO8THandle | None) -> list:
    """The Trainer callbacks of a run: the monitor, α annealing, then ``options.extra_callbacks``."""
    callbacks = [AlphaAnnealingCallback(handle)] if handle is not None else []
    if handle is not None and options.monitor is not None:
        from .monitor import SO8TMonitorCallback

        callbacks.insert(0, SO8TMonitorCallback(options.monitor))
    return callbacks + list(options.extra_callbacks)


def build_training(options: TrainOptions, output_dir: str | Path, demo_overrides: dict | None = None) -> Training:
    """Loads data and model, adds LoRA and gates, and builds the Trainer writing into ``output_dir``.

    Every check that can fail on bad input runs before anything is written.
    """
    options.validate()
    pairs = read_jsonl(options.data or bundled_dataset_path())
    model, tokenizer = load_model_and_tokenizer(options, demo_overrides)
    config = options.so8t_config() if options.gates else None
    if config is not None:  # fail on layout problems before LoRA is added or anything is written
        layout = find_decoder_layout(model)
        resolve_layer_indices(config.layers, layout.num_layers)
    dataset = TokenizedDataset(tokenizer, pairs, options.max_length)

    model = prepare_peft_model(options, model)
    # After get_peft_model, which freezes every parameter that is not a LoRA one.
    handle = attach_so8t(model, config) if config is not None else None

    arguments = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=options.max_steps,
        per_device_train_batch_size=options.batch_size,
        gradient_accumulation_steps=options.grad_accum,
        learning_rate=options.learning_rate,
        lr_scheduler_type="constant",
        logging_steps=max(1, options.max_steps // 10),
        logging_first_step=True,
        save_strategy="no",
        report_to="none",
        seed=options.seed,
        bf16=options.bf16,
        dataloader_num_workers=0,
        # accelerate runs torchrun's processes as a gloo group on CPU only when told the run is CPU-only.
        use_cpu=not torch.cuda.is_available(),
        # Every trainable parameter gets a gradient every step (α a zero one during warmup).
        ddp_find_unused_parameters=False,
    )
    trainer = Trainer(
        model=model,
        args=arguments,
        train_dataset=dataset,
        data_collator=PaddingCollator(tokenizer.pad_token_id),
        callbacks=build_callbacks(options, handle),
    )
    return Training(trainer=trainer, model=model, tokenizer=tokenizer, handle=handle, options=options)


def save_outputs(training: Training, directory: Path) -> None:
    """LoRA adapter, SO8T adapter (``so8t/``), tokenizer and trainer state into ``directory``."""
    training.model.save_pretrained(directory)
    if training.handle is not None:
        save_so8t_adapter(training.handle, directory / SO8T_ADAPTER_DIR)
    training.tokenizer.save_pretrained(directory)
    training.trainer.save_state()
    if training.options.model is None:
        (directory / EMBEDDED_BASE_FILE).write_text(json.dumps({"seed": training.options.seed}) + "\n")


def staging_dir_for(output_dir: Path) -> Path:
    # Fixed name: every rank of a multi-process run must agree on it.
    return output_dir.parent / f".{output_dir.name}.partial"


def publish_outputs(staging: Path, output_dir: Path) -> None:
    """Moves the finished outputs into place; an existing --output-dir (only with --overwrite) goes last."""
    replaced = None
    if output_dir.exists():
        replaced = output_dir.parent / f".{output_dir.name}.replaced"
        shutil.rmtree(replaced, ignore_errors=True)
        output_dir.rename(replaced)
    staging.rename(output_dir)
    if replaced is not None:
        shutil.rmtree(replaced)


def _loss_summary(trainer) -> str:
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return f"loss {losses[0]:.3f} → {losses[-1]:.3f}" if losses else "no loss logged"


def _gate_summary(handle: SO8THandle) -> str:
    activations = torch.sigmoid(handle.alpha.detach().float()).cpu()
    rotation_sizes = handle.theta.detach().float().norm(dim=(1, 2)).cpu()  # ‖θ‖ per layer
    layers = handle.layer_indices
    return (f"gates on layers {layers[0]} … {layers[-1]} ({len(layers)}): σ(α) {activations.min():.3f} … "
            f"{activations.max():.3f}, ‖θ‖ {rotation_sizes.min():.3f} … {rotation_sizes.max():.3f}")


def train(options: TrainOptions) -> Path:
    """The whole command: build, train, save into a staging directory, publish as ``options.output_dir``."""
    output_dir = Path(options.output_dir).resolve()
    staging = staging_dir_for(output_dir)
    training = build_training(options, staging)
    is_main = training.trainer.is_world_process_zero()
    if is_main:  # left over from a run that was killed
        shutil.rmtree(staging, ignore_errors=True)
    try:
        started = time.perf_counter()
        training.trainer.train()
        elapsed = time.perf_counter() - started
        if is_main:
            save_outputs(training, staging)
            publish_outputs(staging, output_dir)
    finally:
        if is_main and staging.exists():
            shutil.rmtree(staging)
    if is_main:
        steps = training.trainer.state.global_step
        print(f"\nso8t train: {steps} steps in {elapsed:.1f} s, {_loss_summary(training.trainer)}")
        if training.handle is not None:
            print(_gate_summary(training.handle))
        print(f"outputs in {output_dir}: LoRA adapter (adapter_model.safetensors), SO8T adapter ({SO8T_ADAPTER_DIR}/), "
              "tokenizer, trainer_state.json")
    return output_dir


@contextlib.contextmanager
def _threads_for(args: argparse.Namespace):
    """One intra-op thread for the embedded demo on CPU, unless OMP_NUM_THREADS says otherwise.

    Its tensors (8 × ~90 tokens × 128) are too small to split, and two threads wait on each other
    whenever another process holds a core: the 150 demo steps took 526 s on two threads and 47 s on
    one, on the same loaded 2-core machine.
    """
    previous = torch.get_num_threads()
    if args.model is None and not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run(args: argparse.Namespace) -> int:
    try:
        with _threads_for(args):
            _run_task(args)
    except SO8TError as error:
        print(f"so8t train: error: {error}", file=sys.stderr)
        return 2
    return 0


def _run_task(args: argparse.Namespace) -> None:
    if args.task == "classify":
        from .classify import train_classifier

        train_classifier(options_from_args(args))
    else:
        train(options_from_args(args))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="so8t train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
