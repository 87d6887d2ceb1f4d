"""Two processes (torchrun, gloo, CPU): values are reduced across ranks before rank 0 writes them once."""

import json
import os
import sys
import textwrap
from pathlib import Path

import numpy as np
from child_processes import run
from monitor_helpers import read_metrics

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent

TWO_RANKS = textwrap.dedent("""
    import json, os, sys
    import conftest  # offline hub, Triton interpreter: the tests' environment
    import torch.distributed as dist
    from monitor_helpers import make_trainer, tiny_gated_model
    from so8t.monitor import SO8TMonitorCallback
    from so8t.monitor.reduce import CrossProcessReducer
    from so8t.training.distributed import end_process_group

    out = sys.argv[1]
    reduced_pairs = []
    reduce = CrossProcessReducer.__call__

    def keep_local_and_reduced(self, vector):
        result = reduce(self, vector)
        reduced_pairs.append((vector.tolist(), result.tolist(), self.reductions))
        return result

    CrossProcessReducer.__call__ = keep_local_and_reduced
    model, handle = tiny_gated_model()
    monitor = SO8TMonitorCallback(interval=1, flush_every=2, plots=False)
    make_trainer(model, handle, out, max_steps=4, monitor=monitor, ddp_backend="gloo").train()
    rank = dist.get_rank()
    with open(f"{out}/rank{rank}.json", "w") as file:
        latest = {name: monitor.latest[name].tolist() for name in ("act_rms", "grad_lora", "ortho_residual_max")}
        latest["logit_std"] = monitor.latest["logit_std"]
        json.dump({"world_size": dist.get_world_size(), "pairs": reduced_pairs, "latest": latest}, file)
    dist.barrier()  # both ranks end together, with the group destroyed: left to exit, gloo may abort a rank
    end_process_group()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)  # past the interpreter's teardown, where gloo now and then aborts a rank (SIGABRT)
""")


def test_two_processes_reduce_then_write_once(tmp_path):
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS_DIR), str(REPO_ROOT)]), OMP_NUM_THREADS="1")
    result = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
                  str(tmp_path / "out")], timeout=300, env=environment)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / "out" / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]

    metrics = tmp_path / "out" / "monitoring" / "metrics.jsonl"
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [line["type"] for line in lines].count("meta") == 1  # rank 1 wrote nothing
    info, samples, _ = read_metrics(metrics)
    assert info.world_size == 2 and [s["step"] for s in samples] == [1, 2, 3, 4]

    for step, (pair0, pair1) in enumerate(zip(ranks[0]["pairs"], ranks[1]["pairs"]), start=1):
        local0, reduced0, reductions = (np.array(pair0[0]), np.array(pair0[1]), pair0[2])
        local1, reduced1 = np.array(pair1[0]), np.array(pair1[1])
        assert not np.allclose(local0, local1, equal_nan=True)  # each rank saw its own batches
        np.testing.assert_array_equal(reduced0, reduced1)
        both = np.stack([local0, local1])
        expected = {"mean": both.mean(0), "sum": both.sum(0), "max": both.max(0), "min": both.min(0)}
        for index, kind in enumerate(reductions):
            np.testing.assert_allclose(reduced0[index], expected[kind][index], rtol=1e-6, equal_nan=True)
    # Both ranks hold the same (reduced) latest sample; rank 0 wrote exactly that.
    assert ranks[0]["latest"] == ranks[1]["latest"]
    for name, value in ranks[0]["latest"].items():
        np.testing.assert_array_equal(samples[-1][name], value)
