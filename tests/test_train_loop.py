"""The training loop's options reach the Trainer and change what it does: learning-rate schedule and
warmup, weight decay (never on the gate logits α), gradient clipping, epochs, and --report-to tensorboard,
whose event files, read back with TensorBoard's own reader, hold the losses and the so8t/* scalars."""

import argparse
import importlib.util
import json
import math

import pytest
from cli_helpers import train as main
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from so8t.training.finetune import BUNDLED_HELD_OUT, build_training
from so8t.training.options import TrainOptions, add_arguments, options_from_args

SMALL = ["--model", "demo", "--batch-size", "4", "--max-length", "64", "--save-steps", "0", "--no-monitor-plots"]


def parse(arguments):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return options_from_args(parser.parse_args(arguments))


def learning_rates(output):
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    return [entry["learning_rate"] for entry in history if "learning_rate" in entry]


@pytest.mark.parametrize("scheduler", ["constant", "linear", "cosine"])
def test_the_learning_rate_follows_the_scheduler_after_a_linear_warmup(scheduler, tmp_path):
    output = tmp_path / "run"
    assert main([*SMALL, "--max-steps", "10", "--learning-rate", "1e-3", "--lr-scheduler", scheduler,
                 "--lr-warmup-ratio", "0.2", "--output-dir", str(output)]) == 0
    rates = learning_rates(output)  # logged at every step: the rate that step used
    assert len(rates) == 10
    assert rates[:2] == pytest.approx([0.0, 5e-4])  # linear warmup over 2 of the 10 steps
    progress = [(step - 2) / 8 for step in range(2, 10)]  # then to 0 at step 10
    shape = {"constant": [1.0] * 8, "linear": [1 - p for p in progress],
             "cosine": [0.5 * (1 + math.cos(math.pi * p)) for p in progress]}[scheduler]
    assert rates[2:] == pytest.approx([1e-3 * s for s in shape], abs=1e-9)


def test_weight_decay_applies_to_lora_and_theta_but_never_to_alpha(tmp_path):
    training = build_training(TrainOptions(model="demo", output_dir=str(tmp_path), weight_decay=0.1, monitor=None), tmp_path)
    decayed = set(training.trainer.get_decay_parameter_names(training.model))
    trainable = {name for name, p in training.model.named_parameters() if p.requires_grad}
    assert any(name.endswith("so8t_gates.theta") for name in decayed)
    assert any("lora_A" in name for name in decayed) and any("lora_B" in name for name in decayed)
    assert [name for name in trainable - decayed] == [n for n in trainable if n.endswith("so8t_gates.alpha")]
    optimizer = training.trainer.create_optimizer()
    decays = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    assert decays[id(training.handle.alpha)] == 0.0 and decays[id(training.handle.theta)] == 0.1


def test_loop_options_reach_the_trainer(tmp_path):
    options = parse(["--model", "demo", "--weight-decay", "0.05", "--max-grad-norm", "0.5", "--lr-scheduler", "cosine",
                     "--lr-warmup-ratio", "0.1", "--output-dir", str(tmp_path / "run")])
    arguments = build_training(options, tmp_path).trainer.args
    assert (arguments.weight_decay, arguments.max_grad_norm, arguments.warmup_steps) == (0.05, 0.5, 0.1)
    assert arguments.lr_scheduler_type == "cosine"


def test_num_epochs_replaces_max_steps(tmp_path):
    output = tmp_path / "run"
    assert main([*SMALL, "--num-epochs", "0.25", "--output-dir", str(output)]) == 0
    state = json.loads((output / "trainer_state.json").read_text())
    batches_per_epoch = math.ceil((216 - BUNDLED_HELD_OUT) / 4)  # the bundled thinking data: 216 rows
    assert state["global_step"] == math.ceil(0.25 * batches_per_epoch)
    assert state["epoch"] == pytest.approx(0.25, abs=1 / batches_per_epoch)


def test_max_steps_and_num_epochs_are_exclusive(capsys):
    with pytest.raises(SystemExit):
        parse(["--max-steps", "5", "--num-epochs", "1"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_report_to_tensorboard_writes_the_so8t_scalars_at_the_sampled_steps_only(tmp_path):
    output = tmp_path / "run"
    # 12 steps: the loss is logged every 2 (10% of the run) and at step 1; the monitor samples 1, 5, 10, 12.
    assert main([*SMALL, "--max-steps", "12", "--monitor-interval", "5", "--eval-fraction", "0.05",
                 "--report-to", "tensorboard", "--output-dir", str(output)]) == 0
    (events,) = {path.parent for path in (output / "runs").rglob("events.out.tfevents.*")}
    accumulator = EventAccumulator(str(events)).Reload()
    scalars = accumulator.Tags()["scalars"]
    assert {"train/loss", "eval/loss", "eval/perplexity"} <= set(scalars)
    so8t = {tag for tag in scalars if "so8t/" in tag}
    assert {"train/so8t/alpha_mean", "train/so8t/gate_max", "train/so8t/grad_lora_min"} <= so8t, scalars
    sampled = [1, 5, 10, 12]
    for tag in so8t:  # once per sampled step, also at step 12, which has an eval log as well
        assert [event.step for event in accumulator.Scalars(tag)] == sampled, tag
    # the monitor has the Trainer log at 5, between its logging steps
    assert [event.step for event in accumulator.Scalars("train/loss")] == [1, 2, 4, 5, 6, 8, 10, 12]
    rows = [json.loads(line) for line in (output / "monitoring" / "metrics.jsonl").read_text().splitlines()]
    alphas = {row["step"]: sum(row["alpha"]) / len(row["alpha"]) for row in rows if row["type"] == "sample"}
    assert sorted(alphas) == sampled
    for event in accumulator.Scalars("train/so8t/alpha_mean"):  # each point is its own step's sample
        assert event.value == pytest.approx(alphas[event.step], rel=1e-6)


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_a_tracker_that_is_not_installed_is_one_line(tracker, tmp_path, capsys):
    if importlib.util.find_spec(tracker) is not None:
        pytest.skip(f"{tracker} is installed here: the Trainer's own integration takes over")
    assert main(["--report-to", tracker, "--output-dir", str(tmp_path / "run")]) == 2
    assert f"--report-to {tracker}: the {tracker} package is not installed" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
