"""The objective registry: objectives the library does not ship, added through the public calls, get exactly
the inputs they declare; bad registrations fail with a message that says what to fix."""

import pytest
import torch

from sapo.objectives import (
    PRESETS,
    aggregation_weights,
    loss_types,
    objective_options,
    policy_loss,
    register_objective,
    register_shaping,
    registry,
    resolve,
    token_loss,
)
from sapo.ops import fused_token_policy_loss

B, T = 3, 5


@pytest.fixture(autouse=True)
def clean_registry(monkeypatch):
    """Registrations made by a test disappear after it (the tables are module globals)."""
    monkeypatch.setattr(registry, "_OBJECTIVES", dict(registry._OBJECTIVES))
    monkeypatch.setattr(registry, "_SHAPINGS", dict(registry._SHAPINGS))


def batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(B, T, generator=gen, dtype=torch.float64).float() * 2  # [B, T]
    old = logprobs + 0.3 * torch.randn(B, T, generator=gen)  # ratios ~ e^N(0, .3)
    advantages = torch.randn(B, generator=gen)  # [B]
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3:] = False
    mask[2, 1:] = False
    return logprobs, old, advantages, mask


def pg(ratio, advantages, logprobs, spec):
    """GPG (Group Policy Gradient): -A logp, no ratio at all."""
    return -advantages * logprobs


def register_gpg():
    register_shaping("pg", pg, consumes=("logprobs",), ratio_levels=("token",))
    return register_objective("gpg", ratio_level="token", shaping="pg", aggregation="token_mean")


def test_gpg_from_outside_the_package_gives_minus_a_logp():
    register_gpg()
    assert "gpg" in loss_types() and PRESETS["gpg"] == {
        "ratio_level": "token", "shaping": "pg", "aggregation": "token_mean"}
    logprobs, old, advantages, mask = batch()
    logp = logprobs.clone().requires_grad_(True)
    loss, metrics = policy_loss(logp, old, advantages, mask, "gpg")
    loss.backward()
    n = mask.sum()
    expected = -(advantages[:, None] * logprobs * mask).sum() / n
    assert torch.allclose(loss, expected, atol=1e-7, rtol=0)
    assert torch.equal(logp.grad, torch.where(mask, -advantages[:, None] / n, 0.0))  # exact: d/dlogp = -A / N
    assert metrics["loss/total"] == pytest.approx(expected.item())
    # no ratio: the old log-probs change nothing
    other, _ = policy_loss(logprobs, old + 1.0, advantages, mask, "gpg", with_metrics=False)
    assert torch.equal(other, loss.detach())


def test_clip_higher_variant_equals_the_same_axes_bitwise():
    register_objective("grpo_clip_higher", ratio_level="token", shaping="clip", aggregation="token_mean",
                       epsilon_low=0.2, epsilon_high=0.4)
    logprobs, old, advantages, mask = batch(1)
    got = [logprobs.clone().requires_grad_(True) for _ in range(2)]
    ours, m1 = policy_loss(got[0], old, advantages, mask, "grpo_clip_higher")
    ref, m2 = policy_loss(got[1], old, advantages, mask, "grpo", aggregation="token_mean", epsilon_high=0.4)
    ours.backward()
    ref.backward()
    assert torch.equal(ours, ref) and torch.equal(got[0].grad, got[1].grad) and m1 == m2
    assert resolve("grpo_clip_higher", epsilon_high=0.3).epsilon_high == 0.3  # options override defaults


def test_declared_inputs_reach_the_shaping_and_only_those():
    seen = []

    def spy(ratio, advantages, logprobs, spec):
        seen.append((ratio.requires_grad, logprobs, spec.max_completion_length))
        return ratio * -advantages

    register_shaping("spy", spy)
    register_shaping("spy_logp", spy, consumes=("logprobs",), ratio_levels=("token", "sequence_token"))
    register_shaping("spy_length", spy, consumes=("max_completion_length",))
    for name in ("spy", "spy_logp", "spy_length"):
        register_objective(f"o_{name}", ratio_level="token", shaping=name, aggregation="token_mean")
    logprobs, old, advantages, mask = batch()
    logp = logprobs.clone().requires_grad_(True)

    policy_loss(logp, old, advantages, mask, "o_spy", with_metrics=False)
    assert seen.pop()[1:] == (None, None)  # no log-probs, no length: not declared
    policy_loss(logp, old, advantages, mask, "o_spy", beta=0.1, ref_logprobs=old, with_metrics=False)
    assert seen.pop()[1] is None  # the KL term needs logp; the shaping still does not get it
    policy_loss(logp, old, advantages, mask, "o_spy_logp", with_metrics=False)
    assert torch.equal(seen.pop()[1], torch.where(mask, logprobs, 0.0))  # with gradient, 0 at padding
    token_loss(logp, old, advantages, resolve("o_spy_logp"))
    assert torch.equal(seen.pop()[1], logprobs)
    token_loss(logp, old, advantages, resolve("o_spy"))
    assert seen.pop()[1] is None

    # max_completion_length: required, and the trainer's objective_options supplies it only where consumed
    with pytest.raises(ValueError, match="shaping='spy_length' declares that it consumes max_completion_length"):
        resolve("o_spy_length")
    assert objective_options("o_spy_length", {"tau_pos": 1.0}, max_completion_length=48) == {
        "tau_pos": 1.0, "max_completion_length": 48}
    assert objective_options("o_spy", {}, max_completion_length=48) == {}
    options = objective_options("o_spy_length", {}, max_completion_length=48)
    policy_loss(logp, old, advantages, mask, "o_spy_length", with_metrics=False, **options)
    assert seen.pop()[2] == 48


def test_builtin_declarations():
    assert objective_options("dr_grpo", {}, max_completion_length=48) == {"max_completion_length": 48}
    assert objective_options("dr_grpo", {"max_completion_length": 7}, max_completion_length=48) == {
        "max_completion_length": 7}  # an explicit value wins
    assert objective_options("dr_grpo", {"max_completion_length": None}, max_completion_length=48) == {
        "max_completion_length": 48}  # None counts as not given, as everywhere in resolve
    assert objective_options("grpo", {"aggregation": "seq_mean_token_sum_norm"}, max_completion_length=48) == {
        "aggregation": "seq_mean_token_sum_norm", "max_completion_length": 48}  # by axes, not by name
    for name in ("sapo", "grpo", "grpo_r2", "dapo", "gspo", "gspo_token", "cispo"):
        assert objective_options(name, {}, max_completion_length=48) == {}
    cispo, grpo, gspo, gspo_token = resolve("cispo"), resolve("grpo"), resolve("gspo"), resolve("gspo_token")
    assert cispo.consumes == {"logprobs", "detached_ratio"} and cispo.fusable
    assert grpo.consumes == set() and grpo.fusable and not grpo.needs_logprobs
    assert gspo.consumes == {"sequence_advantages"} and gspo.sequence_advantages and not gspo.fusable
    assert gspo_token.needs_logprobs and not gspo_token.fusable
    kl = resolve("sapo", beta=0.1)
    assert kl.consumes == {"logprobs", "ref_logprobs"} and kl.needs_ref_logprobs and not kl.fusable


def test_detached_ratio_declaration_removes_the_gradient_through_the_ratio():
    def weighted(ratio, advantages, logprobs, spec):  # -r A logp: with r detached, d/dlogp = -r A
        return ratio * -advantages * logprobs

    register_shaping("weighted", weighted, consumes=("logprobs", "detached_ratio"), ratio_levels=("token",))
    register_shaping("weighted_graph", weighted, consumes=("logprobs",), ratio_levels=("token",))
    register_objective("w_detached", ratio_level="token", shaping="weighted", aggregation="token_mean")
    register_objective("w_graph", ratio_level="token", shaping="weighted_graph", aggregation="token_mean")
    logprobs, old, advantages, mask = batch(2)
    n = mask.sum()
    ratio = torch.exp(logprobs - old)
    grads = {}
    for name in ("w_detached", "w_graph"):
        logp = logprobs.clone().requires_grad_(True)
        policy_loss(logp, old, advantages, mask, name, with_metrics=False)[0].backward()
        grads[name] = logp.grad
    a = advantages[:, None]
    assert torch.allclose(grads["w_detached"], torch.where(mask, -ratio * a / n, 0.0), atol=1e-6, rtol=0)
    # with the graph, d(r logp)/dlogp = r (1 + logp): the declaration is what removes the second part
    assert torch.allclose(grads["w_graph"], torch.where(mask, -ratio * a * (1 + logprobs) / n, 0.0), atol=1e-6, rtol=0)


def test_plugin_objective_runs_in_the_fused_head_like_policy_loss():
    register_gpg()
    spec = resolve("gpg")
    gen = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(B * T, 8, generator=gen), torch.randn(11, 8, generator=gen)  # [N, d], [V, d]
    labels = torch.randint(0, 11, (B * T,), generator=gen)
    _, old, advantages, mask = batch(3)
    h = hidden.clone().requires_grad_(True)
    weights = aggregation_weights(mask, spec).reshape(-1)  # [N]
    loss, _, _ = fused_token_policy_loss(h, weight, labels, old.reshape(-1), advantages[:, None].expand(B, T).reshape(-1),
                                         weights, spec)
    loss.backward()
    h_ref = hidden.clone().requires_grad_(True)
    logp = torch.log_softmax(h_ref @ weight.T, -1).gather(1, labels[:, None]).view(B, T)
    ref, _ = policy_loss(logp, old, advantages, mask, "gpg", with_metrics=False)
    ref.backward()
    assert torch.allclose(loss, ref, atol=1e-6) and torch.allclose(h.grad, h_ref.grad, atol=1e-6)


@pytest.mark.parametrize(("call", "message"), [
    (lambda: register_objective("grpo", ratio_level="token", shaping="clip", aggregation="token_mean"),
     r"loss_type 'grpo' is already registered \(by module sapo.objectives.presets\)"),
    (lambda: register_objective("sapo_gated", ratio_level="token", shaping="clip", aggregation="token_mean"),
     "'sapo_gated' is already registered"),
    (lambda: register_shaping("clip", pg), "shaping 'clip' is already registered"),
    (lambda: register_objective("x", ratio_level="group", shaping="clip", aggregation="token_mean"),
     "objective 'x': unknown ratio_level 'group'; allowed: token, sequence, sequence_token"),
    (lambda: register_objective("x", ratio_level="token", shaping="tanh", aggregation="token_mean"),
     "unknown shaping 'tanh'; registered: clip, soft_gate, cispo, none .register a new one first"),
    (lambda: register_objective("x", ratio_level="token", shaping="clip", aggregation="sum"),
     "unknown aggregation 'sum'"),
    (lambda: register_objective("x", ratio_level="token", shaping="clip", aggregation="token_mean", eps=0.3),
     r"unknown default\(s\) \['eps'\]; allowed: tau_pos"),
    (lambda: register_objective("x", ratio_level="sequence", shaping="clip", aggregation="token_mean"),
     "objective 'x': ratio_level='sequence' gives one loss per sequence"),
    (lambda: register_objective("x", ratio_level="sequence", shaping="cispo", aggregation="seq_mean"),
     "shaping='cispo' needs ratio_level='token'"),
    (lambda: register_objective("x", ratio_level="token", shaping="clip", aggregation="token_mean", epsilon_low=2.0),
     "objective 'x': epsilon_low must be in"),
    (lambda: register_objective("x", ratio_level="token", shaping="soft_gate", aggregation="token_mean", tau_pos="1"),
     "objective 'x': '>' not supported"),
    (lambda: register_objective("", ratio_level="token", shaping="clip", aggregation="token_mean"), "name must be"),
    (lambda: register_objective("a b", ratio_level="token", shaping="clip", aggregation="token_mean"),
     "name must be"),
    (lambda: register_shaping("s", pg, consumes=("ref_logprobs",)),
     r"unknown input\(s\) \['ref_logprobs'\] in consumes; a shaping may consume logprobs, detached_ratio"),
    (lambda: register_shaping("s", pg, consumes=("logprobs",)), "leave 'sequence' out of ratio_levels"),
    (lambda: register_shaping("s", pg, ratio_levels=("tokens",)), "must be a non-empty subset"),
    (lambda: register_shaping("s", "pg"), "fn must be callable"),
    (lambda: resolve("ppo"), "unknown loss_type 'ppo'; allowed: sapo, grpo.*register_objective"),
])
def test_bad_registrations_say_what_to_fix(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_a_failed_registration_registers_nothing():
    with pytest.raises(ValueError):
        register_objective("x", ratio_level="sequence", shaping="clip", aggregation="token_mean")
    assert "x" not in loss_types()
    register_objective("x", ratio_level="sequence", shaping="clip", aggregation="seq_mean")  # the name is free


def test_a_shaping_by_reference_is_imported_on_first_use():
    register_shaping("plain", "sapo.objectives.shaping:unshaped")
    register_shaping("missing", "sapo.objectives.shaping:no_such_function")
    register_objective("o_plain", ratio_level="token", shaping="plain", aggregation="token_mean")
    register_objective("o_missing", ratio_level="token", shaping="missing", aggregation="token_mean")
    logprobs, old, advantages, mask = batch()
    ours, _ = policy_loss(logprobs, old, advantages, mask, "o_plain", with_metrics=False)
    ref, _ = policy_loss(logprobs, old, advantages, mask, "grpo", shaping="none", aggregation="token_mean",
                         with_metrics=False)
    assert torch.equal(ours, ref)
    with pytest.raises(ValueError, match=r"shaping 'missing' .registered by module (tests\.objectives\.)?test_registry. refers to "
                                         "'sapo.objectives.shaping:no_such_function', which cannot be imported: "
                                         "AttributeError"):
        policy_loss(logprobs, old, advantages, mask, "o_missing")
