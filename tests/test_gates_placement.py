"""attach_so8t / SO8THandle: placement at decoder layer outputs, exact identity, detach, architectures,
gradient checkpointing, KV-cache generation, and the attributes the monitor reads."""

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from torch import nn

import so8t.gates.bank
from so8t import SO8TConfig, SO8TError, attach_so8t, find_so8t_handle
from so8t.models.demo import build_demo_tokenizer, demo_model_config
from so8t_kernels import so8_exp, so8_rotate

HIDDEN = 32
LAYERS = 4


@pytest.fixture(scope="module")
def tokenizer():
    return build_demo_tokenizer()


def tiny_phi3(tokenizer, seed=0, **overrides):
    torch.manual_seed(seed)
    values = dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                  num_attention_heads=4, num_key_value_heads=4)
    model = transformers.Phi3ForCausalLM(demo_model_config(tokenizer, **{**values, **overrides}))
    return model.eval()


def input_ids(batch=2, length=9, seed=1):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def randomize(handle, theta_std=0.5, alpha=0.5):
    with torch.no_grad():
        handle.theta.normal_(0.0, theta_std, generator=torch.Generator().manual_seed(3))
        handle.alpha.fill_(alpha)


def test_default_gates_sit_on_intermediate_layers_with_fp32_parameters(tokenizer):
    model = tiny_phi3(tokenizer)
    handle = attach_so8t(model)
    assert handle.layer_indices == [1, 2]
    assert handle.theta.shape == (2, HIDDEN // 8, 28) and handle.theta.dtype == torch.float32
    assert handle.alpha.shape == (2,) and torch.all(handle.alpha == -5.0)
    assert handle.activation_stats.shape == (2, 3)
    assert handle.model is model and find_so8t_handle(model) is handle
    explicit = attach_so8t(tiny_phi3(tokenizer), SO8TConfig(layers=[3, 0]))
    assert explicit.layer_indices == [0, 3]


def test_zero_theta_or_closed_gate_gives_the_base_logits_exactly(tokenizer):
    model = tiny_phi3(tokenizer)
    ids = input_ids()
    with torch.no_grad():
        base = model(ids).logits
        handle = attach_so8t(model)  # θ = 0: every R is exactly I, whatever α
        handle.alpha.fill_(2.0)
        assert torch.equal(model(ids).logits, base)
        randomize(handle)
        handle.alpha.fill_(float("-inf"))  # σ(α) = 0
        assert torch.equal(model(ids).logits, base)
        handle.alpha.fill_(0.0)
        assert not torch.allclose(model(ids).logits, base, atol=1e-3)


def test_the_gate_rotates_the_output_of_its_layer_and_changes_everything_downstream(tokenizer):
    model = tiny_phi3(tokenizer)
    ids = input_ids()
    with torch.no_grad():
        base = model(ids, output_hidden_states=True)
        handle = attach_so8t(model, SO8TConfig(layers=[1]))
        randomize(handle)
        gated = model(ids, output_hidden_states=True)
        rotation, _ = so8_exp(handle.theta)
    # hidden_states[i + 1] is the output of layer i: layer 0 is untouched, layer 1's output is rotated.
    assert torch.equal(gated.hidden_states[1], base.hidden_states[1])
    expected = so8_rotate(base.hidden_states[2], rotation[0], handle.alpha[0])
    torch.testing.assert_close(gated.hidden_states[2], expected, rtol=0, atol=0)
    assert not torch.allclose(gated.hidden_states[3], base.hidden_states[3], atol=1e-4)
    assert not torch.allclose(gated.logits, base.logits, atol=1e-3)


def test_gated_model_stays_causal(tokenizer):
    model = tiny_phi3(tokenizer)
    randomize(attach_so8t(model))
    ids = input_ids()
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 256
    with torch.no_grad():
        logits, changed_logits = model(ids).logits, model(changed).logits
    torch.testing.assert_close(changed_logits[:, :6], logits[:, :6], rtol=0, atol=0)
    assert not torch.allclose(changed_logits[:, 6:], logits[:, 6:], atol=1e-4)


@pytest.fixture
def exp_calls(monkeypatch):
    calls = []

    def counting_so8_exp(theta):
        calls.append(tuple(theta.shape))
        return so8_exp(theta)

    monkeypatch.setattr(so8t.gates.bank, "so8_exp", counting_so8_exp)
    return calls


def test_one_so8_exp_call_per_forward_builds_every_layers_rotation(tokenizer, exp_calls):
    model = tiny_phi3(tokenizer, num_hidden_layers=6)
    attach_so8t(model)
    model(input_ids()).logits.sum().backward()
    assert exp_calls == [(4, HIDDEN // 8, 28)]


def gradients(model, handle, ids):
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    lm_weight = model.model.layers[0].mlp.down_proj.weight
    return handle.theta.grad.clone(), handle.alpha.grad.clone(), lm_weight.grad.clone()


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(tokenizer, exp_calls, use_reentrant):
    model = tiny_phi3(tokenizer).train()
    handle = attach_so8t(model)
    randomize(handle)
    ids = input_ids()
    plain = gradients(model, handle, ids)
    # transformers 5.20 renamed gradient_checkpointing_enable; vLLM pins 5.19.
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": use_reentrant})
    exp_calls.clear()
    checkpointed = gradients(model, handle, ids)
    # The recomputation does not rebuild the rotations; a reentrant replay of a whole layer call (transformers
    # before 5.20) builds its own (see the next test).
    assert len(exp_calls) in ((1, 1 + len(handle.layer_indices)) if use_reentrant else (1,))
    for expected, actual in zip(plain, checkpointed):
        assert expected.abs().sum() > 0
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-7)


def checkpoint_whole_layer_calls(model, use_reentrant):
    """Decoder layers checkpointed as transformers before 5.20 did (and 5.19, which vLLM pins): the
    layer's whole ``__call__``, forward hooks (the gates) included, is recomputed in the backward."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    def checkpointed_call(layer, *args, **kwargs):
        kwargs.update(use_cache=False, past_key_values=None, cache=None)  # a replay must not extend the KV cache
        return checkpoint(partial(nn.Module.__call__, layer, **kwargs), *args, use_reentrant=use_reentrant)

    for layer in model.model.layers:
        layer.__class__ = type(f"Checkpointed{type(layer).__name__}", (type(layer),), {"__call__": checkpointed_call})


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointing_that_recomputes_the_gates_gives_the_same_gradients(tokenizer, exp_calls, use_reentrant):
    model = tiny_phi3(tokenizer).train()
    handle = attach_so8t(model)
    randomize(handle)
    ids = input_ids()
    plain = gradients(model, handle, ids)
    checkpoint_whole_layer_calls(model, use_reentrant)
    exp_calls.clear()
    checkpointed = gradients(model, handle, ids)
    # Non-reentrant: the replay reuses the forward's rotations (and must: it checks the saved tensors).
    # Reentrant: each gated layer's replay builds its own, its only path from the loss to θ.
    assert len(exp_calls) == (1 + len(handle.layer_indices) if use_reentrant else 1)
    for expected, actual in zip(plain, checkpointed):
        assert expected.abs().sum() > 0
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-7)


def test_generation_with_kv_cache_matches_the_full_forward(tokenizer, exp_calls):
    model = tiny_phi3(tokenizer)
    randomize(attach_so8t(model))
    prompt = input_ids(batch=1, length=5)
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True,
                                output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
        assert len(exp_calls) == 12  # one per forward: 6 cached decode steps, 6 uncached
        full = model(cached.sequences).logits
    assert torch.equal(cached.sequences, uncached)
    for step, step_logits in enumerate(cached.logits):
        torch.testing.assert_close(step_logits, full[:, prompt.shape[1] - 1 + step], rtol=1e-4, atol=1e-5)


def forward_hook_ids(model):
    return {name: list(module._forward_hooks) + list(module._forward_pre_hooks) for name, module in model.named_modules()}


def test_detach_restores_the_model_exactly(tokenizer):
    model = tiny_phi3(tokenizer)
    ids = input_ids()
    with torch.no_grad():
        base = model(ids).logits  # also installs transformers' own output-capturing hooks
    hooks, keys = forward_hook_ids(model), set(model.state_dict())
    attributes = {name: set(vars(module)) for name, module in model.named_modules()}
    handle = attach_so8t(model)
    randomize(handle)
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, base)
    handle.detach()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)
    assert forward_hook_ids(model) == hooks
    assert set(model.state_dict()) == keys
    assert {name: set(vars(module)) for name, module in model.named_modules()} == attributes
    assert not any("so8t" in name for name, _ in model.named_parameters())
    assert find_so8t_handle(model) is None
    attach_so8t(model)  # and can be gated again


def test_gates_train_through_a_peft_wrapper(tokenizer):
    model = tiny_phi3(tokenizer).train()
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["qkv_proj", "o_proj"]))
    handle = attach_so8t(peft_model)
    randomize(handle)
    assert handle.layer_indices == [1, 2] and find_so8t_handle(peft_model) is handle
    trainable = {name for name, parameter in peft_model.named_parameters() if parameter.requires_grad}
    assert any(name.endswith("so8t_gates.theta") for name in trainable)
    assert any(name.endswith("so8t_gates.alpha") for name in trainable)
    ids = input_ids()
    peft_model(input_ids=ids, labels=ids).loss.backward()
    assert handle.theta.grad.abs().sum() > 0 and handle.alpha.grad.abs().sum() > 0
    lora_grads = [p.grad for name, p in peft_model.named_parameters() if "lora_B" in name]
    assert lora_grads and all(grad is not None for grad in lora_grads)


ARCHITECTURES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM, {"head_dim": 8}),
    "gpt_neox": (transformers.GPTNeoXConfig, transformers.GPTNeoXForCausalLM, {}),
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel, {"n_embd": HIDDEN, "n_layer": 5, "n_head": 4}),
}


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_every_decoder_layout_is_found_and_gated(architecture):
    config_class, model_class, extra = ARCHITECTURES[architecture]
    values = dict(vocab_size=64, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=5,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    if architecture == "gpt2":
        values = dict(vocab_size=64, n_positions=32)
    torch.manual_seed(0)
    model = model_class(config_class(**values, **extra)).eval()
    ids = input_ids() % 64
    with torch.no_grad():
        base = model(ids).logits
        handle = attach_so8t(model)
        assert handle.layer_indices == [1, 2, 3]
        assert torch.equal(model(ids).logits, base)
        randomize(handle)
        assert not torch.allclose(model(ids).logits, base, atol=1e-4)


class TupleLayer(nn.Module):
    """A decoder layer in the style of transformers 4: returns (hidden_states, attention weights)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, hidden_states):
        return hidden_states + self.linear(hidden_states), None


class TupleDecoder(nn.Module):
    def __init__(self, num_layers=4):
        super().__init__()
        self.config = transformers.PretrainedConfig(num_hidden_layers=num_layers, hidden_size=HIDDEN)
        self.layers = nn.ModuleList(TupleLayer() for _ in range(num_layers))

    def forward(self, hidden_states):
        outputs = []
        for layer in self.layers:
            hidden_states, _ = layer(hidden_states)
            outputs.append(hidden_states)
        return outputs


def test_layers_that_return_tuples_are_gated():
    torch.manual_seed(0)
    model = TupleDecoder()
    x = torch.randn(2, 3, HIDDEN)
    base = model(x)
    handle = attach_so8t(model)
    randomize(handle)
    gated = model(x)
    rotation, _ = so8_exp(handle.theta)
    torch.testing.assert_close(gated[0], base[0], rtol=0, atol=0)
    torch.testing.assert_close(gated[1], so8_rotate(base[1], rotation[0], handle.alpha[0]), rtol=0, atol=0)


def test_monitor_attributes_come_from_the_latest_forward(tokenizer):
    model = tiny_phi3(tokenizer).train()
    handle = attach_so8t(model)
    randomize(handle)
    assert handle.last_rotation is None and handle.last_residual is None
    ids = input_ids()
    out = model(ids, labels=ids, output_hidden_states=True)
    out.loss.backward()
    assert handle.last_rotation.shape == (2, HIDDEN // 8, 8, 8) and not handle.last_rotation.requires_grad
    assert handle.last_residual.shape == (2, HIDDEN // 8) and handle.last_residual.dtype == torch.float32
    torch.testing.assert_close(handle.last_rotation, so8_exp(handle.theta)[0].detach())
    assert torch.all(handle.activation_stats == 0)  # not collected unless asked

    handle.collect_activation_stats = True
    out = model(ids, labels=ids, output_hidden_states=True)
    out.loss.backward()
    for gate, layer in enumerate(handle.layer_indices):
        y = out.hidden_states[layer + 1].detach()
        expected = torch.stack([y.square().sum(), y.abs().max(), torch.tensor(0.0)])
        torch.testing.assert_close(handle.activation_stats[gate], expected, rtol=1e-5, atol=1e-6)
    assert not handle.activation_stats.requires_grad and handle.activation_stats.grad_fn is None


def test_bf16_hidden_states_keep_fp32_gate_parameters(tokenizer):
    model = tiny_phi3(tokenizer).to(torch.bfloat16).train()
    handle = attach_so8t(model)
    randomize(handle)
    ids = input_ids()
    logits = model(ids).logits
    assert logits.dtype == torch.bfloat16 and handle.theta.dtype == torch.float32
    logits.float().square().mean().backward()
    assert handle.theta.grad.dtype == torch.float32 and handle.theta.grad.abs().sum() > 0


class NoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = transformers.PretrainedConfig(num_hidden_layers=4, hidden_size=HIDDEN)
        self.body = nn.Sequential(nn.Linear(HIDDEN, HIDDEN))


def test_models_so8t_cannot_gate_are_clear_errors(tokenizer):
    with pytest.raises(SO8TError, match="not a multiple of 8"):
        attach_so8t(tiny_phi3(tokenizer, hidden_size=36, num_attention_heads=3, num_key_value_heads=3))
    with pytest.raises(SO8TError, match="cannot find the decoder layers of NoLayers"):
        attach_so8t(NoLayers())
    with pytest.raises(SO8TError, match=r"layer index 4 is out of range: the model has 4 decoder layers \(0 … 3\)"):
        attach_so8t(tiny_phi3(tokenizer), SO8TConfig(layers=[1, 4]))
    with pytest.raises(SO8TError, match="no intermediate layer"):
        attach_so8t(tiny_phi3(tokenizer, num_hidden_layers=2))
    model = tiny_phi3(tokenizer)
    attach_so8t(model)
    with pytest.raises(SO8TError, match="already has SO8T gates"):
        attach_so8t(model)
