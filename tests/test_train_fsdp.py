"""``so8t train`` under FSDP through ``accelerate launch --use_fsdp`` (no launcher of so8t's own).

On CPU accelerate cannot shard: it runs CPU processes as data parallel (MULTI_CPU) and drops the FSDP
request silently, so so8t refuses with one line. On GPUs (benchmarks/device_check.sh runs this file with
SO8T_TEST_DEVICE=cuda): 4-bit QLoRA with gates, one process per GPU; every rank ends with the same gates,
and the saved adapter holds them.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

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


    finetune(TrainOptions(output_dir=sys.argv[1], max_steps=4, warmup_steps=1, batch_size=4, max_length=64,
                          load_in_4bit=torch.cuda.is_available(), bf16=torch.cuda.is_available(),
                          extra_callbacks=[SaveGates()]))
""")
FSDP_FLAGS = ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
              "--fsdp_state_dict_type", "FULL_STATE_DICT"]


def launch(processes: int, *program: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *FSDP_FLAGS, *program]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU case: this machine has a GPU")
def test_fsdp_on_cpu_is_refused_with_one_line(tmp_path):
    output = tmp_path / "out"
    result = launch(2, "-m", "so8t", "train", "--max-steps", "2", "--max-length", "64", "--output-dir", str(output))
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("so8t train: error: ")]
    # One per rank that got that far: the launcher stops the other rank once one has failed.
    assert 1 <= len(lines) <= 2, result.stderr[-3000:]
    assert all("accelerate shards models only on GPUs" in line and "MULTI_CPU" in line for line in lines)
    assert not output.exists() and not list(tmp_path.iterdir())


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
    saved = load_file(tmp_path / "out" / "so8t" / "so8t_adapter.safetensors")
    assert torch.equal(saved["theta"].float(), ranks[0]["theta"])
    assert torch.equal(saved["alpha"].float(), ranks[0]["alpha"])
