"""``so8t train`` as two torchrun processes on CPU (gloo): both ranks end with identical gates."""

import os
import subprocess
import sys
import textwrap

import torch

WORKER = textwrap.dedent("""
    import sys

    import torch
    from transformers import TrainerCallback

    from so8t import find_so8t_handle
    from so8t.training.finetune import finetune
    from so8t.training.options import TrainOptions


    class SaveGates(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            handle = find_so8t_handle(model)
            gates = {"theta": handle.theta.detach(), "alpha": handle.alpha.detach(), "world_size": args.world_size}
            torch.save(gates, f"{sys.argv[2]}/gates-{args.process_index}.pt")


    finetune(TrainOptions(output_dir=sys.argv[1], max_steps=6, warmup_steps=2, batch_size=4, max_length=64,
                          extra_callbacks=[SaveGates()]))
""")


def test_two_process_training_keeps_the_gates_identical(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    output, gates = tmp_path / "out", tmp_path / "gates"
    gates.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(script), str(output), str(gates)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on two cores
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]

    rank0, rank1 = (torch.load(gates / f"gates-{rank}.pt") for rank in (0, 1))
    assert rank0["world_size"] == rank1["world_size"] == 2
    # The ranks saw different batches: only the all-reduced gradients keep the gates equal.
    assert torch.equal(rank0["theta"], rank1["theta"]) and torch.equal(rank0["alpha"], rank1["alpha"])
    assert rank0["theta"].abs().sum() > 0
    assert not torch.allclose(rank0["alpha"], torch.tensor(-2.1972), atol=1e-4)  # trained after the 2 warmup steps
    assert result.stdout.count("outputs in") == 1  # only rank 0 writes and reports
    assert (output / "so8t" / "so8t_adapter.safetensors").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["gates", "out", "worker.py"]
