"""SO8TConfig: the documented defaults (all intermediate layers, α from −5 to σ(α) = 0.1, θ = 0), JSON
round-trip, and clear errors for bad values."""

import pytest

from so8t import SO8TConfig, SO8TError


def test_defaults_follow_the_design():
    config = SO8TConfig()
    assert config.layers == "all_intermediate"
    assert (config.alpha_init, config.alpha_target, config.schedule, config.theta_init_std) == (-5.0, 0.1, "linear", 0.0)


def test_json_round_trip():
    config = SO8TConfig(layers=[3, 7, 11], alpha_init=-4.0, alpha_target=0.2, warmup_steps=7,
                        schedule="cosine", theta_init_std=0.01)
    assert SO8TConfig.from_json(config.to_json()) == config
    assert SO8TConfig.from_json(SO8TConfig().to_json()) == SO8TConfig()


@pytest.mark.parametrize("values, message", [
    ({"layers": "some"}, "expected 'all_intermediate' or a list"),
    ({"layers": []}, "non-empty list"),
    ({"layers": [1, 1]}, "gated once"),
    ({"layers": [1.5]}, "integer layer indices"),
    ({"alpha_target": 1.0}, r"in \(0, 1\)"),
    ({"alpha_init": float("nan")}, "finite"),
    ({"warmup_steps": -1}, "≥ 0"),
    ({"schedule": "step"}, "linear, cosine, sigmoid"),
    ({"theta_init_std": -0.1}, "≥ 0"),
])
def test_bad_values_are_clear_errors(values, message):
    with pytest.raises(SO8TError, match=message):
        SO8TConfig(**values)


def test_unknown_json_fields_are_rejected():
    with pytest.raises(SO8TError, match="unknown SO8TConfig field"):
        SO8TConfig.from_dict({"layers": "all_intermediate", "gate_size": 8})
