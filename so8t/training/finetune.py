"""``so8t train --task generate``: QLoRA fine-tuning of a causal LM with SO(8) gates on the intermediate
decoder layers, with the HF Trainer and peft LoRA.

Multi-process runs (torchrun/accelerate) are the Trainer's: gate gradients are all-reduced with the
rest, so every rank holds the same gates.
"""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import Trainer

from ..data.dataset import PaddingCollator, TokenizedDataset, bundled_dataset_path, read_jsonl
from ..gates.adapter import SO8T_ADAPTER_DIR, save_so8t_adapter
from ..gates.placement import SO8THandle, attach_so8t, find_decoder_layout, resolve_layer_indices
from ..models.demo import write_embedded_base_record
from ..models.fused_loss import apply_fused_loss
from ..models.loading import load_model_and_tokenizer
from .distributed import check_sharding
from .heldout import split_held_out
from .lora import add_lora
from .options import TrainOptions
from .outputs import TRAINER_STATE_FILE
from .preflight import preflight
from .runner import run_training
from .summary import gate_summary, outputs_summary
from .trainer import build_trainer


# 16 of the bundled data's 216 rows: its held-out loss before and after training, 4 batches of 4 per eval.
BUNDLED_HELD_OUT = 16
BUNDLED_HELD_OUT_FRACTION = BUNDLED_HELD_OUT / 216
# The closing line's example: a question of the bundled data's kind that no row asks.
CHAT_EXAMPLE = "What is 23 + 19?"


@dataclass
class Training:
    """A ready-to-run training: ``trainer.train()`` runs it; ``handle`` is None for a run without gates."""

    trainer: Trainer
    model: torch.nn.Module
    tokenizer: object
    handle: SO8THandle | None
    options: TrainOptions


def build_training(options: TrainOptions, output_dir: str | Path, demo_overrides: dict | None = None) -> Training:
    """Loads data and model, adds LoRA and gates, and builds the Trainer writing into ``output_dir``.

    Every check that can fail on bad input runs before anything is written. The bundled data comes with
    held-out rows (BUNDLED_HELD_OUT of them, chosen by ``--seed``) unless the options say otherwise
    (``eval_fraction=0``: no eval).
    """
    if options.output_dir is None:
        options = replace(options, output_dir=str(output_dir))
    options = preflight(options)
    if options.data is None and options.eval_data is None and options.eval_fraction is None:
        options = replace(options, eval_fraction=BUNDLED_HELD_OUT_FRACTION)
    check_sharding(on_cpu=not torch.cuda.is_available())
    pairs, held_out = split_held_out(read_jsonl(options.data or bundled_dataset_path()), options, read_jsonl)
    model, tokenizer = load_model_and_tokenizer(**options.base_model_arguments(), demo_overrides=demo_overrides)
    config = options.so8t_config() if options.gates else None
    if config is not None:  # fail on layout problems before LoRA is added or anything is written
        layout = find_decoder_layout(model)
        resolve_layer_indices(config.layers, layout.num_layers)
    dataset = TokenizedDataset(tokenizer, pairs, options.max_length)
    eval_dataset = TokenizedDataset(tokenizer, held_out, options.max_length) if held_out is not None else None

    model = add_lora(options, model)
    # After get_peft_model, which freezes every parameter that is not a LoRA one.
    handle = attach_so8t(model, config) if config is not None else None
    if options.fused_loss:  # before the Trainer, which reads the forward's signature
        why_not = apply_fused_loss(model)
        if why_not is not None:
            print(f"so8t train: the model's own loss is used (--no-fused-loss implied): {why_not}", file=sys.stderr)
    trainer = build_trainer(options, model, handle, output_dir, dataset, eval_dataset,
                            PaddingCollator(tokenizer.pad_token_id))
    return Training(trainer=trainer, model=model, tokenizer=tokenizer, handle=handle, options=options)


def save_outputs(training: Training, directory: Path, trainable: dict | None = None) -> None:
    """LoRA adapter, SO8T adapter (``so8t/``), tokenizer and trainer state into ``directory``; under FSDP
    the LoRA tensors come from ``trainable``, the whole trainable tensors gathered from every rank."""
    training.model.save_pretrained(directory, state_dict=trainable)
    if training.handle is not None:
        save_so8t_adapter(training.handle, directory / SO8T_ADAPTER_DIR)
    training.tokenizer.save_pretrained(directory)
    training.trainer.state.save_to_json(str(directory / TRAINER_STATE_FILE))
    if training.options.is_demo:
        write_embedded_base_record(directory, training.options.seed)


def _loss_summary(trainer) -> str:
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    summary = f"loss {losses[0]:.3f} → {losses[-1]:.3f}" if losses else "no loss logged"
    held_out = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
    if len(held_out) > 1:
        summary += f", held-out loss {held_out[0]:.3f} → {held_out[-1]:.3f}"
    return summary


def chat_command(output_dir: Path) -> str:
    """The ``so8t generate`` command that chats with the run's adapter, on the base the run recorded."""
    return shlex.join(["so8t", "generate", "--adapter", str(output_dir), "--show-thinking", CHAT_EXAMPLE])


def finetune(options: TrainOptions) -> Path:
    """The whole task: build, train in ``options.output_dir``, publish the final files there."""
    options = preflight(options)
    output_dir = Path(options.output_dir).resolve()
    training = build_training(options, output_dir)
    options = training.options
    started = time.perf_counter()
    run_training(training.trainer, options, training.handle,
                 lambda directory, trainable: save_outputs(training, directory, trainable))
    elapsed = time.perf_counter() - started
    if training.trainer.is_world_process_zero():
        steps = training.trainer.state.global_step
        print(f"\nso8t train: {steps} steps in {elapsed:.1f} s, {_loss_summary(training.trainer)}")
        if training.handle is not None:
            print(gate_summary(training.handle))
        print(outputs_summary(output_dir, training.handle is not None, options.monitor is not None))
        print(f"chat with it: {chat_command(output_dir)}")
    return output_dir
