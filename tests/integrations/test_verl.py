"""sapo.integrations.verl without verl: verl 0.9.1 pins transformers < 5.11 and pulls ray, so it is not installed
here. The functions are called with verl's policy-loss arguments and a stand-in config with the attribute names
of verl 0.9.1's ActorConfig; registration is checked against a stand-in registry. Nothing here runs inside verl.
"""

import inspect
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import torch

from sapo.integrations import verl as sapo_verl
from sapo.objectives import policy_loss


@dataclass
class StandInActorConfig:
    """The fields of verl 0.9.1's ActorConfig that its policy losses read."""

    clip_ratio: float = 0.2
    clip_ratio_low: float | None = 0.2
    clip_ratio_high: float | None = 0.28
    loss_agg_mode: str = "token-mean"
    loss_scale_factor: int | None = None
    tau_pos: float = 1.0
    tau_neg: float = 1.05
    global_batch_info: dict = field(default_factory=dict)


def batch(B=6, T=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    log_prob = (-torch.rand(B, T, generator=gen) * 3).requires_grad_()
    old = log_prob.detach() + 0.4 * torch.randn(B, T, generator=gen)
    advantages = torch.randn(B, 1, generator=gen).expand(B, T).clone()  # verl broadcasts outcome advantages
    mask = torch.rand(B, T, generator=gen) > 0.3
    mask[:, 0] = True
    mask[2] = False  # an empty row: verl's default seq-mean skips it
    return old, log_prob, advantages, mask


def sapo_token_losses(log_prob, old, advantages, tau_pos=1.0, tau_neg=1.05):
    """-f(r) A with f(r) = sigmoid(tau (r - 1)) 4 / tau (SAPO eq. 5), per token."""
    ratio = torch.exp(log_prob - old)
    tau = torch.where(advantages > 0, tau_pos, tau_neg)
    return -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * advantages


def test_signature_is_verls():
    parameters = inspect.signature(sapo_verl.compute_policy_loss_sapo_gated).parameters
    assert list(parameters) == ["old_log_prob", "log_prob", "advantages", "response_mask", "loss_agg_mode",
                                "config", "rollout_is_weights"]
    assert parameters["loss_agg_mode"].default == "token-mean" and parameters["rollout_is_weights"].default is None


@pytest.mark.parametrize("info", [{}, {"dp_size": 2, "batch_num_tokens": 50, "global_batch_size": 16}])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_sapo_gated_is_the_gate_loss_with_verls_normalisers(mode, info):
    old, log_prob, advantages, mask = batch()
    config = StandInActorConfig(tau_neg=1.3, global_batch_info=info)
    loss, metrics = sapo_verl.compute_policy_loss_sapo_gated(old, log_prob, advantages, mask, mode, config)
    loss.backward()

    leaf = log_prob.detach().clone().requires_grad_()
    per_token = sapo_token_losses(leaf, old, advantages, tau_neg=1.3)
    maskf = mask.float()
    dp = info.get("dp_size", 1)
    if mode == "token-mean":
        expected = (per_token * maskf).sum() / (info.get("batch_num_tokens", maskf.sum()) / dp)
    else:
        rows = info.get("global_batch_size", (maskf.sum(-1) > 0).sum()) / dp  # verl: non-empty rows by default
        if mode == "seq-mean-token-mean":
            expected = ((per_token * maskf).sum(-1) / maskf.sum(-1).clamp(min=1)).sum() / rows
        else:  # the padded width stands in for L_max when loss_scale_factor is not set
            expected = (per_token * maskf).sum() / (rows * mask.shape[1])
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.allclose(log_prob.grad, leaf.grad, rtol=1e-5, atol=1e-9)
    assert metrics["actor/pg_clipfrac"] == 0.0 and metrics["actor/pg_clipfrac_lower"] == 0.0
    assert 0 < metrics["actor/sapo/gate_mean"] < 1
    log_ratio = (old - log_prob.detach())[mask]
    assert metrics["actor/ppo_kl"] == pytest.approx(log_ratio.mean().item(), rel=1e-5)


def test_loss_scale_factor_sets_l_max():
    old, log_prob, advantages, mask = batch()
    loss_12, _ = sapo_verl.compute_policy_loss_sapo_gated(
        old, log_prob, advantages, mask, "seq-mean-token-sum-norm", StandInActorConfig(loss_scale_factor=12))
    loss_width, _ = sapo_verl.compute_policy_loss_sapo_gated(
        old, log_prob, advantages, mask, "seq-mean-token-sum-norm", StandInActorConfig())
    assert loss_12.item() == pytest.approx(loss_width.item() * mask.shape[1] / 12, rel=1e-6)


def test_clip_objectives_read_clip_ratios():
    old, log_prob, advantages, mask = batch()
    config = StandInActorConfig(clip_ratio_low=0.1, clip_ratio_high=0.3)
    register = {}
    sapo_verl.register(lambda name: lambda fn: register.setdefault(name, fn))
    loss, metrics = register["sapo_dapo"](old, log_prob, advantages, mask, "token-mean", config)
    expected, ours = policy_loss(log_prob, old, advantages, mask, "dapo", epsilon_low=0.1, epsilon_high=0.3,
                                 num_sequences=(mask.sum(-1) > 0).sum())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert metrics["actor/pg_clipfrac"] == ours["clip/frac"] > 0

    cispo, metrics = register["sapo_cispo"](old, log_prob, advantages, mask, "token-mean", config)
    ratio = torch.exp(log_prob.detach() - old).clamp(max=1.3)  # relative cap 1 + clip_ratio_high, no lower clip
    expected = (-ratio * advantages * log_prob.detach())[mask].mean()
    assert cispo.item() == pytest.approx(expected.item(), rel=1e-6)
    assert metrics["actor/pg_clipfrac"] == metrics["actor/cispo/capped_frac"]


def test_gspo_takes_seq_mean_and_per_sequence_advantages():
    old, log_prob, advantages, mask = batch()
    old = log_prob.detach() + 1e-3 * torch.randn(old.shape, generator=torch.Generator().manual_seed(1))
    config = StandInActorConfig(clip_ratio_low=3e-4, clip_ratio_high=4e-4)
    fn = sapo_verl.make_policy_loss("gspo")
    loss, metrics = fn(old, log_prob, advantages, mask, "seq-mean-token-mean", config)
    expected, _ = policy_loss(log_prob, old, advantages[:, 0], mask, "gspo", epsilon_low=3e-4, epsilon_high=4e-4,
                              num_sequences=5)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert "actor/clip/seq_frac" in metrics
    with pytest.raises(ValueError, match="seq-mean-token-mean"):
        fn(old, log_prob, advantages, mask, "token-mean", config)


def test_rollout_is_weights_multiply_token_losses():
    old, log_prob, advantages, mask = batch()
    weights = torch.rand(mask.shape, generator=torch.Generator().manual_seed(2))
    loss, _ = sapo_verl.compute_policy_loss_sapo_gated(old, log_prob, advantages, mask, "token-mean",
                                                       StandInActorConfig(), weights)
    per_token = sapo_token_losses(log_prob.detach(), old, advantages) * weights
    assert loss.item() == pytest.approx(per_token[mask].mean().item(), rel=1e-6)


def test_bad_settings_raise():
    old, log_prob, advantages, mask = batch()
    fn = sapo_verl.compute_policy_loss_sapo_gated
    with pytest.raises(ValueError, match="allowed: token-mean"):
        fn(old, log_prob, advantages, mask, "token-sum", StandInActorConfig())
    with pytest.raises(ValueError, match="dp_size=2 needs"):
        fn(old, log_prob, advantages, mask, "token-mean", StandInActorConfig(global_batch_info={"dp_size": 2}))
    with pytest.raises(ValueError, match="unknown loss_type"):
        sapo_verl.make_policy_loss("ppo")


def test_register_against_a_stand_in_registry():
    registry = {}

    def register_policy_loss(name):  # verl's decorator factory shape
        def decorator(fn):
            registry[name] = fn
            return fn
        return decorator

    names = sapo_verl.register(register_policy_loss)
    assert names == list(registry) == list(sapo_verl.VERL_NAMES)
    assert {"sapo_gated", "sapo_grpo", "sapo_dapo", "sapo_dr_grpo", "sapo_gspo", "sapo_cispo"} <= set(registry)
    assert "sapo" not in registry and "gspo" not in registry  # verl's own names stay verl's
    custom = sapo_verl.register_objective("sapo_soft", "sapo", register_policy_loss, tau_neg=2.0)
    old, log_prob, advantages, mask = batch()
    loss, _ = custom(old, log_prob, advantages, mask, "token-mean", StandInActorConfig(tau_neg=1.05))
    expected = sapo_token_losses(log_prob.detach(), old, advantages, tau_neg=2.0)[mask].mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_plugins_stay_optional():
    code = ("import sys, sapo, sapo.integrations, sapo.integrations.verl; "
            "assert not {'trl', 'verl'} & set(sys.modules), sorted({'trl', 'verl'} & set(sys.modules))")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
