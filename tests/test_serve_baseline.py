"""so8t serve --adapter on a baseline run (so8t train --no-so8t): the model is served as trained, without gates."""

import torch
from serve_helpers import one_torch_thread  # noqa: F401 (autouse)

from so8t.commands.main import main
from so8t.gates.placement import find_so8t_handle
from so8t.serve.engines.hf import HFEngine


def test_a_baseline_adapter_is_served_without_gates(tmp_path):
    output = tmp_path / "baseline"
    assert main(["train", "--model", "demo", "--no-so8t", "--no-monitor", "--output-dir", str(output), "--max-steps", "2"]) == 0
    assert not (output / "so8t").exists()
    engine = HFEngine.load(adapter=str(output))
    engine.shutdown()
    assert engine.handle is None and find_so8t_handle(engine.model) is None
    assert engine.sigma_alpha == {} and engine.gated_layers == []
    layers = engine.model.model.layers
    assert not any(layer._forward_hooks for layer in layers)
    with torch.no_grad():
        assert torch.isfinite(engine.model(torch.tensor([[1, 2, 3]])).logits).all()
