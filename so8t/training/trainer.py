"""The HF Trainer of a ``so8t train`` run, for either task: its arguments from ``TrainOptions`` and its
callbacks in the order they must run."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from ..gates.placement import BANK_ATTRIBUTE, SO8THandle
from .callbacks import build_callbacks, use_training_log
from .checkpoints import CheckpointCallback
from .options import TrainOptions
from .outputs import MONITORING_DIR, WRITE_ERRNOS, unwritable

# The loss is logged every 10% of the run's steps.
LOG_EVERY = 0.1
# By default the held-out set is evaluated before the first step and after the last only (an eval of
# SmolLM2's 16 bundled held-out rows took 11 s, two training steps, on the loaded 2-core machine): with
# eval steps no run reaches, the Trainer evaluates at its last step.
ONLY_AT_THE_END = 1 << 62


class SO8TTrainer(Trainer):
    """The HF Trainer, plus: α (the gate logits) is never weight-decayed, since decay would pull every
    gate towards σ(0) = 0.5; each eval loss is logged with its perplexity."""

    def get_decay_parameter_names(self, model) -> list[str]:
        return [name for name in super().get_decay_parameter_names(model)
                if not name.endswith(f"{BANK_ATTRIBUTE}.alpha")]

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "eval_loss" in logs:
            logs["eval_perplexity"] = math.exp(logs["eval_loss"]) if logs["eval_loss"] < 700 else math.inf
        super().log(logs, *args, **kwargs)


def training_arguments(options: TrainOptions, output_dir: Path) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=options.max_steps if options.num_epochs is None else -1,
        num_train_epochs=options.num_epochs or 1.0,
        per_device_train_batch_size=options.batch_size,
        per_device_eval_batch_size=options.batch_size,
        gradient_accumulation_steps=options.grad_accum,
        learning_rate=options.learning_rate,
        # HF's "constant" ignores the warmup; "constant_with_warmup" is the same without one.
        lr_scheduler_type="constant_with_warmup" if options.lr_scheduler == "constant" else options.lr_scheduler,
        warmup_steps=options.lr_warmup_ratio,  # below 1: a fraction of the steps
        weight_decay=options.weight_decay,
        max_grad_norm=options.max_grad_norm,
        logging_steps=LOG_EVERY,
        logging_first_step=True,
        eval_strategy="steps" if options.evaluates else "no",
        eval_steps=(options.eval_steps or ONLY_AT_THE_END) if options.evaluates else None,
        eval_on_start=options.evaluates and options.resume is None,  # a resumed run was evaluated there
        save_strategy="steps" if options.save_steps else "no",
        save_steps=options.save_steps or 1,
        save_total_limit=None,  # CheckpointCallback rotates once a checkpoint is complete
        report_to=options.report_to,
        seed=options.seed,
        bf16=options.bf16,
        dataloader_num_workers=0,
        # accelerate runs torchrun's processes as a gloo group on CPU only when told the run is CPU-only.
        use_cpu=not torch.cuda.is_available(),
        # Every trainable parameter gets a gradient every step (α a zero one during warmup).
        ddp_find_unused_parameters=False,
    )


def monitoring_dir(options: TrainOptions) -> Path | None:
    if options.monitor is None:
        return None
    return Path(options.monitor.directory or Path(options.output_dir).resolve() / MONITORING_DIR)


def build_trainer(options: TrainOptions, model, handle: SO8THandle | None, output_dir: str | Path,
                  train_dataset, eval_dataset, data_collator) -> SO8TTrainer:
    # Also with --save-steps 0: a run stopped by SIGTERM or SIGINT saves a checkpoint of its last step.
    callbacks = [*build_callbacks(options, handle),
                 CheckpointCallback(handle, monitoring_dir(options), options.save_total_limit)]
    try:
        trainer = SO8TTrainer(model=model, args=training_arguments(options, Path(output_dir)),
                              train_dataset=train_dataset, eval_dataset=eval_dataset, data_collator=data_collator)
    except OSError as error:  # its os.makedirs(output_dir), where a filesystem refuses what access() allowed
        if error.errno not in WRITE_ERRNOS:
            raise
        raise unwritable(Path(output_dir), error) from None
    # Ahead of the Trainer's own callbacks, so that the reporting ones (TensorBoard, W&B, MLflow) see the
    # so8t/* scalars the monitor adds to the log of each step it samples.
    trainer.callback_handler.callbacks[:0] = callbacks
    use_training_log(trainer, handle)
    return trainer
