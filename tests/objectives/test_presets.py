import pytest

from sapo.objectives import PRESETS, LossSpec, loss_types, resolve


def test_preset_defaults():
    sapo = resolve("sapo")
    assert (sapo.ratio_level, sapo.shaping, sapo.aggregation) == ("token", "soft_gate", "seq_mean_token_mean")
    assert (sapo.tau_pos, sapo.tau_neg, sapo.beta, sapo.kl_estimator) == (1.0, 1.05, 0.0, "k3")
    assert sapo.log_ratio_clamp == 20.0
    assert (resolve("grpo").epsilon_low, resolve("grpo").epsilon_high) == (0.2, 0.2)
    assert (resolve("grpo_r2").epsilon_low, resolve("grpo_r2").epsilon_high) == (0.2, 0.27)
    assert (resolve("dapo").epsilon_high, resolve("dapo").aggregation) == (0.28, "token_mean")
    assert resolve("dr_grpo", max_completion_length=8).aggregation == "seq_mean_token_sum_norm"
    gspo = resolve("gspo")
    assert (gspo.ratio_level, gspo.aggregation, gspo.epsilon_low, gspo.epsilon_high) == ("sequence", "seq_mean", 3e-4, 4e-4)
    assert resolve("gspo_token").ratio_level == "sequence_token"
    cispo = resolve("cispo")
    assert (cispo.shaping, cispo.aggregation, cispo.epsilon_high, cispo.cispo_cap_mode) == (
        "cispo", "token_mean", 5.0, "absolute")


def test_aliases():
    assert resolve("sapo_gated") == resolve("sapo")
    spec = resolve("grpo", epsilon=0.1)
    assert (spec.epsilon_low, spec.epsilon_high) == (0.1, 0.1)
    spec = resolve("grpo", epsilon=0.1, epsilon_high=0.3)
    assert (spec.epsilon_low, spec.epsilon_high) == (0.1, 0.3)
    spec = resolve("sapo", sapo_temperature_pos=0.5, sapo_temperature_neg=2.0)
    assert (spec.tau_pos, spec.tau_neg) == (0.5, 2.0)
    assert resolve("sapo", tau_pos=None) == resolve("sapo")  # None means "not given"


def test_axis_overrides():
    spec = resolve("grpo", shaping="soft_gate", aggregation="token_mean")
    assert (spec.loss_type, spec.shaping, spec.aggregation) == ("grpo", "soft_gate", "token_mean")
    assert resolve("gspo", shaping="soft_gate").shaping == "soft_gate"


def test_every_preset_resolves_and_is_listed():
    for name in PRESETS:
        options = {"max_completion_length": 8} if name == "dr_grpo" else {}
        assert isinstance(resolve(name, **options), LossSpec)
    assert set(loss_types()) == set(PRESETS) | {"sapo_gated"}


@pytest.mark.parametrize(
    ("loss_type", "options", "message"),
    [
        ("ppo", {}, "allowed: sapo, grpo"),
        ("sapo", {"temperature": 1.0}, "unknown option"),
        ("sapo", {"tau_pos": 0.0}, "tau_pos must be > 0"),
        ("sapo", {"tau_neg": -1.0}, "tau_neg must be > 0"),
        ("grpo", {"epsilon_low": -0.1}, "epsilon_low must be >= 0"),
        ("grpo", {"epsilon": -0.1}, "must be >= 0"),
        ("grpo", {"epsilon_low": 1.5}, "epsilon_low must be in"),
        ("dr_grpo", {}, "max_completion_length"),
        ("dr_grpo", {"max_completion_length": 0}, "positive int"),
        ("gspo", {"shaping": "cispo"}, "allowed shapings for sequence ratios"),
        ("gspo_token", {"shaping": "cispo"}, "ratio_level='token'"),
        ("gspo", {"aggregation": "token_mean"}, "aggregation must be 'seq_mean'"),
        ("grpo", {"aggregation": "seq_mean"}, "needs ratio_level='sequence'"),
        ("grpo", {"ratio_level": "group"}, "allowed: token, sequence, sequence_token"),
        ("grpo", {"shaping": "tanh"}, "allowed: clip, soft_gate, cispo, none"),
        ("grpo", {"aggregation": "sum"}, "allowed: seq_mean_token_mean"),
        ("sapo", {"kl_estimator": "k2"}, "allowed: k1, k3"),
        ("sapo", {"beta": -1.0}, "beta must be >= 0"),
        ("sapo", {"log_ratio_clamp": 0.0}, "log_ratio_clamp"),
        ("cispo", {"epsilon_high": 0.0}, "epsilon_high > 0"),
        ("cispo", {"cispo_cap_mode": "relative"}, "pass epsilon_high explicitly"),
        ("cispo", {"cispo_cap_mode": "clamp", "epsilon_high": 1.0}, "allowed: absolute, relative"),
        ("sapo", {"tau_pos": 1.0, "sapo_temperature_pos": 2.0}, "contradicts"),
    ],
)
def test_invalid_options_raise(loss_type, options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve(loss_type, **options)
