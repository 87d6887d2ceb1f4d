"""save_so8t_adapter / load_so8t_adapter: exact logits on a fresh base model, and clear errors."""

import json

import pytest
import torch
from transformers import Phi3ForCausalLM

from so8t import SO8TConfig, SO8TError, attach_so8t, load_so8t_adapter, save_so8t_adapter
from so8t.gates.adapter import CONFIG_FILE, WEIGHTS_FILE
from so8t.models.demo import build_demo_tokenizer, demo_model_config

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=4)


@pytest.fixture(scope="module")
def tokenizer():
    return build_demo_tokenizer()


def base_model(tokenizer, **overrides):
    torch.manual_seed(0)  # the same base weights every time
    return Phi3ForCausalLM(demo_model_config(tokenizer, **{**TINY, **overrides})).eval()


@pytest.fixture(scope="module")
def saved(tokenizer, tmp_path_factory):
    model = base_model(tokenizer)
    handle = attach_so8t(model, SO8TConfig(layers=[1, 3], warmup_steps=7, schedule="cosine", theta_init_std=0.3))
    with torch.no_grad():
        handle.alpha.copy_(torch.tensor([-1.0, 0.5]))
    path = save_so8t_adapter(model, tmp_path_factory.mktemp("adapter"))
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits
    return path, handle, ids, logits


def test_loading_onto_a_fresh_base_model_reproduces_the_logits_exactly(tokenizer, saved):
    path, handle, ids, logits = saved
    fresh = base_model(tokenizer)
    loaded = load_so8t_adapter(fresh, path)
    assert loaded.layer_indices == [1, 3]
    assert torch.equal(loaded.theta, handle.theta) and torch.equal(loaded.alpha, handle.alpha)
    assert loaded.config.schedule == "cosine" and loaded.config.warmup_steps == 7
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, logits)


def test_adapter_files_carry_a_format_version_and_the_model_shape(saved):
    path, *_ = saved
    description = json.loads((path / CONFIG_FILE).read_text())
    assert description["format_version"] == 1
    assert (description["num_layers"], description["hidden_size"], description["layer_indices"]) == (5, 32, [1, 3])
    assert (path / WEIGHTS_FILE).is_file()


def test_an_adapter_that_does_not_fit_is_a_clear_error(tokenizer, saved, tmp_path):
    path, *_ = saved
    with pytest.raises(SO8TError, match="hidden_size=32; this model has hidden_size=40"):
        load_so8t_adapter(base_model(tokenizer, hidden_size=40, num_attention_heads=5, num_key_value_heads=5), path)
    with pytest.raises(SO8TError, match="num_layers=5; this model has num_layers=6"):
        load_so8t_adapter(base_model(tokenizer, num_hidden_layers=6), path)
    future = tmp_path / "future"
    future.mkdir()
    (future / WEIGHTS_FILE).write_bytes((path / WEIGHTS_FILE).read_bytes())
    description = json.loads((path / CONFIG_FILE).read_text())
    (future / CONFIG_FILE).write_text(json.dumps({**description, "format_version": 2}))
    with pytest.raises(SO8TError, match="format version 2; this so8t reads version 1"):
        load_so8t_adapter(base_model(tokenizer), future)
    with pytest.raises(SO8TError, match="not an SO8T adapter directory"):
        load_so8t_adapter(base_model(tokenizer), tmp_path / "missing")
    with pytest.raises(SO8TError, match="no SO8T gates to save"):
        save_so8t_adapter(base_model(tokenizer), tmp_path / "nothing")


def test_a_failed_load_leaves_the_model_without_gates(tokenizer, saved, tmp_path):
    path, *_ = saved
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / CONFIG_FILE).write_text((path / CONFIG_FILE).read_text())
    from safetensors.torch import save_file

    save_file({"theta": torch.zeros(2, 4, 27), "alpha": torch.zeros(2)}, broken / WEIGHTS_FILE)
    model = base_model(tokenizer)
    with pytest.raises(SO8TError, match=r"theta in .* has shape \(2, 4, 27\); expected \(2, 4, 28\)"):
        load_so8t_adapter(model, broken)
    assert not any("so8t" in name for name, _ in model.named_parameters())
