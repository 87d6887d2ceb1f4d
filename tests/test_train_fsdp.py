"""``so8t train`` under FSDP through ``accelerate launch --use_fsdp`` (no launcher of so8t's own).

On CPU accelerate cannot shard: it runs CPU processes as data parallel (MULTI_CPU) and drops the FSDP
request silently, so so8t refuses with one line. On GPUs (benchmarks/device_check.sh runs this file with
SO8T_TEST_DEVICE=cuda): 4-bit QLoRA with gates, one process per GPU; every rank ends with the same gates,
and the saved adapter and checkpoint hold them. On CPU torch itself shards over gloo: the checkpoint of a
model sharded by FSDP2 (``fully_shard``) or FSDP1 holds the whole gates, gathered from every rank, and the
final files of an FSDP2 run hold the whole LoRA tensors, which load into the logits the sharded model gave,
and a sharded judge calibrates on every rank (a forward on rank 0 alone would wait for the others forever).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from child_processes import run

WORKER = textwrap.dedent("""
    import sys

    import torch
    from transformers import TrainerCallback

    from so8t import find_so8t_handle
    from so8t.training.finetune import finetune
    from so8t.training.options import TrainOptions


    def full(parameter):  # under FSDP2 a sharded DTensor: every rank takes part in the gather
        return (parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter).detach().float().cpu()


    class SaveGates(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            handle = find_so8t_handle(model)
            fsdp = sum(type(module).__name__.startswith("FSDP") for module in model.modules())
            gates = {"theta": full(handle.theta), "alpha": full(handle.alpha), "world_size": args.world_size,
                     "fsdp_modules": fsdp}
            torch.save(gates, f"{sys.argv[2]}/gates-{args.process_index}.pt")


    finetune(TrainOptions(model="demo", output_dir=sys.argv[1], max_steps=4, warmup_steps=1, batch_size=4,
                          max_length=64,
                          save_steps=2, load_in_4bit=torch.cuda.is_available(), bf16=torch.cuda.is_available(),
                          extra_callbacks=[SaveGates()]))
""")
FSDP_FLAGS = ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
              "--fsdp_state_dict_type", "FULL_STATE_DICT"]


def launch(processes: int, *program: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *FSDP_FLAGS, *program]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return run(command, timeout=300, env=env)


def two_ranks(worker: str, tmp_path, *argv: str) -> subprocess.CompletedProcess:
    """``worker`` run as two torchrun processes on CPU (gloo), one thread each."""
    script = tmp_path / "worker.py"
    script.write_text(worker)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               *argv]
    return run(command, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU case: this machine has a GPU")
def test_fsdp_on_cpu_is_refused_with_one_line(tmp_path):
    output = tmp_path / "out"
    result = launch(2, "-m", "so8t", "train", "--model", "demo", "--max-steps", "2", "--max-length", "64", "--output-dir", str(output))
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("so8t train: error: ")]
    # One per rank that got that far: the launcher stops the other rank once one has failed.
    assert 1 <= len(lines) <= 2, result.stderr[-3000:]
    assert all("accelerate shards models only on GPUs" in line and "MULTI_CPU" in line for line in lines)
    assert not output.exists() and not list(tmp_path.iterdir())


def test_an_fsdp1_launch_is_refused_before_anything_loads(monkeypatch):
    from so8t import SO8TError
    from so8t.training.distributed import check_sharding

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")  # what accelerate launch --use_fsdp sets without --fsdp_version
    with pytest.raises(SO8TError, match="FSDP2 only: launch with accelerate launch --use_fsdp --fsdp_version 2"):
        check_sharding(on_cpu=False)
    monkeypatch.setenv("FSDP_VERSION", "2")
    check_sharding(on_cpu=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP through accelerate needs GPUs (see the CPU test)")
def test_fsdp_qlora_keeps_the_gates_identical_on_every_rank_and_saves_them(tmp_path):
    from safetensors.torch import load_file

    processes = torch.cuda.device_count()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    (tmp_path / "gates").mkdir()
    result = launch(processes, str(script), str(tmp_path / "out"), str(tmp_path / "gates"))
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(tmp_path / "gates" / f"gates-{rank}.pt") for rank in range(processes)]
    assert all(rank["world_size"] == processes and rank["fsdp_modules"] > 0 for rank in ranks), ranks
    for rank in ranks[1:]:
        assert torch.equal(rank["theta"], ranks[0]["theta"]) and torch.equal(rank["alpha"], ranks[0]["alpha"])
    assert ranks[0]["theta"].abs().sum() > 0
    for adapter in ("so8t", "checkpoint-4/so8t"):  # the final files, and the last checkpoint's
        saved = load_file(tmp_path / "out" / adapter / "so8t_adapter.safetensors")
        assert torch.equal(saved["theta"].float(), ranks[0]["theta"]), adapter
        assert torch.equal(saved["alpha"].float(), ranks[0]["alpha"]), adapter
    assert (tmp_path / "out" / "checkpoint-4" / "so8t_checkpoint.json").is_file()


# The demo model with LoRA and gates (θ, α drawn alike on both ranks), sharded by torch over gloo, then a
# checkpoint saved by so8t's callback on both ranks; rank 0 also writes the gates as they were.
SHARDED_CHECKPOINT = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file

    from so8t import attach_so8t
    from so8t.gates.placement import find_decoder_layout
    from so8t.models.loading import load_model_and_tokenizer
    from so8t.training.checkpoints import CheckpointCallback
    from so8t.training.distributed import end_process_group
    from so8t.training.lora import add_lora
    from so8t.training.options import TrainOptions

    dist.init_process_group("gloo")
    rank, version, output = dist.get_rank(), sys.argv[1], Path(sys.argv[2])
    options = TrainOptions(model="demo")
    model = add_lora(options, load_model_and_tokenizer(**options.base_model_arguments())[0])
    handle = attach_so8t(model, options.so8t_config())
    draw = torch.Generator().manual_seed(0)
    with torch.no_grad():
        handle.theta.copy_(torch.randn(handle.theta.shape, generator=draw))
        handle.alpha.copy_(torch.rand(handle.alpha.shape, generator=draw) - 3)
    whole = {"theta": handle.theta.detach().clone(), "alpha": handle.alpha.detach().clone()}
    layer_type = type(find_decoder_layout(model).layers[0])
    if version == "2":
        from torch.distributed.fsdp import fully_shard

        for module in [module for module in model.modules() if isinstance(module, layer_type)]:
            fully_shard(module)
        fully_shard(model)
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        model = FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({layer_type}),
                                         device_id=torch.device("cpu"), use_orig_params=True)

    def sharded():
        return hasattr(handle.theta, "full_tensor") or handle.theta.shape != whole["theta"].shape

    before = sharded()
    args = SimpleNamespace(output_dir=str(output), device=torch.device("cpu"))
    state = SimpleNamespace(global_step=1, is_world_process_zero=rank == 0)
    CheckpointCallback(handle, None, keep=0).on_save(args, state, None, model=model)
    report = {"sharded before": before, "sharded after": sharded()}
    (output / f"rank-{rank}.json").write_text(json.dumps(report))
    if rank == 0:
        save_file(whole, output / "whole.safetensors")
    dist.barrier()  # rank 1 ends once rank 0 has written: a rank that ends while the other works may abort it
    end_process_group()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)  # past the interpreter's teardown, where gloo now and then aborts a rank (SIGABRT)
""")


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="the CPU stand-in: on a GPU machine the accelerate FSDP test above saves the gates")
@pytest.mark.parametrize("version", ["2", "1"], ids=["FSDP2 fully_shard", "FSDP1"])
def test_a_checkpoint_of_a_sharded_model_holds_the_whole_gates_gathered_from_every_rank(version, tmp_path):
    from safetensors.torch import load_file

    output = tmp_path / "out"
    output.mkdir()
    result = two_ranks(SHARDED_CHECKPOINT, tmp_path, version, str(output))
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        report = json.loads((output / f"rank-{rank}.json").read_text())
        assert report == {"sharded before": True, "sharded after": True}, report  # gathered for the save only
    whole = load_file(output / "whole.safetensors")
    saved = load_file(output / "checkpoint-1" / "so8t" / "so8t_adapter.safetensors")
    assert torch.equal(saved["theta"], whole["theta"]) and torch.equal(saved["alpha"], whole["alpha"])
    assert whole["theta"].abs().sum() > 0 and (output / "checkpoint-1" / "so8t_checkpoint.json").is_file()


# The demo model with LoRA and gates, every trainable tensor drawn alike on both ranks (LoRA B is not left at
# 0), sharded by FSDP2, its logits for a few tokens, then the final files written as so8t train's runner does:
# the trainable tensors gathered on every rank, rank 0 writing; rank 0 also writes what it expects.
SHARDED_FINAL_OUTPUTS = textwrap.dedent("""
    import os
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.fsdp import fully_shard
    from transformers import TrainerState

    from so8t import attach_so8t
    from so8t.gates.placement import find_decoder_layout
    from so8t.models.loading import load_model_and_tokenizer
    from so8t.training.distributed import end_process_group, whole_gates, whole_trainable_state
    from so8t.training.finetune import Training, save_outputs
    from so8t.training.lora import add_lora
    from so8t.training.options import TrainOptions

    dist.init_process_group("gloo")
    rank, output = dist.get_rank(), Path(sys.argv[1])
    options = TrainOptions(model="demo")
    model, tokenizer = load_model_and_tokenizer(**options.base_model_arguments())
    model = add_lora(options, model)
    handle = attach_so8t(model, options.so8t_config())
    draw = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=draw) * 0.05)
    lora = {name: parameter.detach().clone() for name, parameter in model.named_parameters() if "lora_" in name}
    layer_type = type(find_decoder_layout(model).layers[0])
    for module in [module for module in model.modules() if isinstance(module, layer_type)]:
        fully_shard(module)
    fully_shard(model)
    model.eval()
    tokens = torch.randint(3, 250, (2, 12), generator=draw)
    with torch.no_grad():
        logits = model(input_ids=tokens).logits
    trainable = whole_trainable_state(model)
    with whole_gates(model, handle):
        if rank == 0:
            training = Training(trainer=SimpleNamespace(state=TrainerState()), model=model, tokenizer=tokenizer,
                                handle=handle, options=options)
            save_outputs(training, output / "final", trainable)
            save_file({"tokens": tokens, "logits": logits, **lora}, output / "expected.safetensors")
    dist.barrier()  # as above
    end_process_group()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)  # past the interpreter's teardown, where gloo now and then aborts a rank (SIGABRT)
""")


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="the CPU stand-in: on a GPU machine the accelerate FSDP test above saves the adapter")
def test_the_final_files_of_an_fsdp2_run_hold_the_whole_lora_tensors_and_give_its_logits(tmp_path):
    from safetensors.torch import load_file

    from so8t.models.inference import load_for_inference

    output = tmp_path / "out"
    output.mkdir()
    result = two_ranks(SHARDED_FINAL_OUTPUTS, tmp_path, str(output))
    assert result.returncode == 0, result.stderr[-3000:]
    expected = load_file(output / "expected.safetensors")
    saved = load_file(output / "final" / "adapter_model.safetensors")
    lora = {name.replace(".default", ""): tensor for name, tensor in expected.items() if "lora_" in name}
    assert sorted(saved) == sorted(lora) and len(saved) == 6 * 4 * 2  # 6 layers × 4 modules × A, B
    for name, tensor in lora.items():  # whole, not one rank's shard
        assert saved[name].shape == tensor.shape and torch.equal(saved[name], tensor), name
    loaded = load_for_inference("demo", str(output / "final"))  # one process, as so8t generate loads a run
    with torch.no_grad():
        logits = loaded.model(input_ids=expected["tokens"]).logits
    assert torch.allclose(logits, expected["logits"], atol=1e-5, rtol=0), (logits - expected["logits"]).abs().max()


# so8t train --task classify on the demo judge (every weight trained) sharded by FSDP2 over gloo, with a
# stand-in trainer that does not train: the calibration's forward runs on every rank and rank 0 publishes.
SHARDED_JUDGE = textwrap.dedent("""
    import os
    import sys
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from transformers import TrainerState

    from so8t.gates.placement import find_decoder_layout
    from so8t.training import classify
    from so8t.training.distributed import end_process_group
    from so8t.training.options import TrainOptions


    def sharded_stand_in(options, model, handle, output_dir, dataset, eval_dataset, collator):
        layer_type = type(find_decoder_layout(model).layers[0])
        for module in [module for module in model.modules() if isinstance(module, layer_type)]:
            fully_shard(module)
        fully_shard(model)
        return SimpleNamespace(model=model, state=TrainerState(log_history=[{"loss": 1.0}]),
                               args=SimpleNamespace(device=torch.device("cpu")), add_callback=lambda callback: None,
                               is_world_process_zero=lambda: dist.get_rank() == 0,
                               train=lambda resume_from_checkpoint=None: None)


    dist.init_process_group("gloo")
    classify.build_trainer = sharded_stand_in
    classify.train_classifier(TrainOptions(model="demo", task="classify", output_dir=sys.argv[1], max_length=64))
    end_process_group()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)  # past the interpreter's teardown, where gloo now and then aborts a rank (SIGABRT)
""")


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="the CPU stand-in: on a GPU machine accelerate shards the judge itself")
def test_a_sharded_judge_is_calibrated_on_every_rank_and_published_whole(tmp_path):
    from so8t.judge.calibration import CALIBRATION_FILE, fit_temperature
    from so8t.judge.data import ClassificationCollator, ClassificationDataset, bundled_heldout_path, read_labelled_jsonl
    from so8t.judge.judge import load_classifier
    from so8t.training.classify import class_logits

    output = tmp_path / "judge"
    result = two_ranks(SHARDED_JUDGE, tmp_path, str(output))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("held-out accuracy") == 1, result.stdout  # rank 0 reports, once
    published = json.loads((output / CALIBRATION_FILE).read_text())
    model, tokenizer = load_classifier(output)  # one process, as so8t serve loads a judge
    rows = read_labelled_jsonl(bundled_heldout_path())
    logits, labels = class_logits(model, ClassificationDataset(tokenizer, rows, 64),
                                  ClassificationCollator(tokenizer.pad_token_id), batch_size=8)
    unsharded = fit_temperature(logits, labels)
    assert published["held_out_rows"] == len(rows) == len(labels)
    assert abs(published["nll_before"] - unsharded.nll_before) < 1e-5, (published, unsharded)
