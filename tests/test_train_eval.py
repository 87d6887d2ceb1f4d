"""Held-out evaluation in ``so8t train``: eval loss and perplexity before training, every --eval-steps and
at the end, in trainer_state.json and in the monitor's files; a deterministic --eval-fraction split; and
an eval before 4-bit training that leaves LoRA learning (bitsandbytes' CPU repack would stop it)."""

import json
import math
import re

import pytest
from cli_helpers import train as main
from transformers import TrainerCallback

from so8t.judge.data import bundled_safety_path
from so8t.monitor.metrics_log import read_run
from so8t.training.finetune import build_training
from so8t.training.heldout import split_held_out
from so8t.training.options import TrainOptions


def eval_entries(output):
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    return [entry for entry in history if "eval_loss" in entry]


def test_eval_loss_and_perplexity_before_every_n_steps_and_at_the_end(tmp_path):
    output = tmp_path / "run"
    assert main(["--model", "demo", "--eval-fraction", "0.1", "--eval-steps", "3", "--max-steps", "7", "--batch-size", "4",
                 "--max-length", "64", "--save-steps", "0", "--no-monitor-plots", "--output-dir", str(output)]) == 0
    entries = eval_entries(output)
    assert [entry["step"] for entry in entries] == [0, 3, 6, 7]
    for entry in entries:
        assert entry["eval_perplexity"] == pytest.approx(math.exp(entry["eval_loss"]))
    assert entries[-1]["eval_loss"] < entries[0]["eval_loss"]
    monitored = read_run(output / "monitoring" / "metrics.jsonl").losses.points["eval_loss"]
    assert monitored == [(entry["step"], pytest.approx(entry["eval_loss"])) for entry in entries]


def test_the_judge_evaluates_on_an_eval_data_file(tmp_path):
    output = tmp_path / "judge"
    heldout = bundled_safety_path().with_name("safety_heldout.jsonl")
    assert main(["--model", "demo", "--task", "classify", "--eval-data", str(heldout), "--eval-steps", "2", "--max-steps", "2",
                 "--batch-size", "8", "--save-steps", "0", "--no-monitor-plots", "--output-dir", str(output)]) == 0
    assert [entry["step"] for entry in eval_entries(output)] == [0, 2]


def test_the_eval_fraction_split_is_deterministic_by_seed_and_disjoint():
    rows = list(range(100))
    train, held = split_held_out(rows, TrainOptions(eval_fraction=0.1, seed=0), read=None)
    assert len(held) == 10 and sorted(train + held) == rows
    assert split_held_out(rows, TrainOptions(eval_fraction=0.1, seed=0), read=None) == (train, held)
    assert split_held_out(rows, TrainOptions(eval_fraction=0.1, seed=1), read=None)[1] != held
    assert split_held_out(rows, TrainOptions(), read=None) == (rows, None)


@pytest.mark.parametrize(("arguments", "message"), [
    (["--eval-fraction", "1.5"], r"--eval-fraction must be in \[0, 1\), got 1.5"),
    (["--eval-steps", "0", "--eval-fraction", "0.1"], "--eval-steps must be at least 1, got 0"),
])
def test_bad_eval_options_are_one_line(arguments, message, tmp_path, capsys):
    assert main([*arguments, "--output-dir", str(tmp_path / "run")]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_eval_data_and_eval_fraction_are_exclusive(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--eval-fraction", "0.1", "--eval-data", "x.jsonl"])
    assert exit_info.value.code == 2
    assert "argument --eval-data: not allowed with argument --eval-fraction" in capsys.readouterr().err


class LoraGradients(TrainerCallback):
    def __init__(self):
        self.zero, self.evaluated = [], 0

    def on_evaluate(self, args, state, control, **kwargs):
        self.evaluated += 1

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        # lora_A gets no gradient while lora_B is still its zero init (step 0).
        self.zero.append(sorted(name for name, p in model.named_parameters()
                                if ("lora_B" in name or (state.global_step > 0 and "lora_A" in name))
                                and (p.grad is None or not p.grad.any())))


def test_an_eval_before_4bit_training_leaves_every_lora_gradient_nonzero(tmp_path):
    recorder = LoraGradients()
    options = TrainOptions(model="demo", output_dir=str(tmp_path / "run"), load_in_4bit=True, max_steps=3, warmup_steps=0,
                           batch_size=4, max_length=48, monitor=None, save_steps=0, eval_fraction=0.05,
                           eval_steps=100, extra_callbacks=[recorder])
    build_training(options, options.output_dir).trainer.train()  # the demo's shapes, where the repack happens
    assert recorder.evaluated == 2  # before the first step and at the end
    assert recorder.zero == [[]] * 3
