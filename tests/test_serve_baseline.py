"""so8t serve --adapter on a baseline run (so8t train --no-so8t): the model is served as trained, without gates."""

import torch
from serve_helpers import one_torch_thread  # noqa: F401 (autouse)

from so8t.commands.main import main
from so8t.gates.placement import find_so8t_handle
from so8t.serve.generation import load_generator


def test_a_baseline_adapter_is_served_without_gates(tmp_path):
    output = tmp_path / "baseline"
    assert main(["train", "--no-so8t", "--no-monitor", "--output-dir", str(output), "--max-steps", "2"]) == 0
    assert not (output / "so8t").exists()
    generator = load_generator(adapter=str(output))
    assert generator.handle is None and find_so8t_handle(generator.model) is None
    assert generator.sigma_alpha() == {}
    layers = generator.model.model.layers
    assert not any(layer._forward_hooks for layer in layers)
    with torch.no_grad():
        assert torch.isfinite(generator.model(torch.tensor([[1, 2, 3]])).logits).all()
