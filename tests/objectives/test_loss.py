import math

import pytest
import torch

from sapo.objectives import aggregation_weights, metric_names, policy_loss, resolve, token_loss
from sapo.objectives.shaping import soft_gate_weight

ALL = ["sapo", "grpo", "grpo_r2", "dapo", "dr_grpo", "gspo", "gspo_token", "cispo"]
TOKEN_LEVEL = ["sapo", "grpo", "grpo_r2", "dapo", "dr_grpo", "cispo"]
L_MAX = 12


def options_for(loss_type):
    return {"max_completion_length": L_MAX} if loss_type == "dr_grpo" else {}


def make_batch(B=5, T=7, seed=0, spread=0.3, empty_row=True):
    gen = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(B, T, generator=gen, dtype=torch.float64).float() * 3
    old = logprobs + spread * torch.randn(B, T, generator=gen)
    advantages = torch.randn(B, generator=gen)
    mask = torch.rand(B, T, generator=gen) > 0.3
    mask[0] = True
    mask[1, 0] = True
    if empty_row:
        mask[-1] = False
    return logprobs.requires_grad_(), old, advantages, mask


def grad_of(loss_type, logprobs, old, advantages, mask, **options):
    logprobs = logprobs.detach().clone().requires_grad_()
    loss, metrics = policy_loss(logprobs, old, advantages, mask, loss_type, **options_for(loss_type), **options)
    loss.backward()
    return loss.detach(), logprobs.grad, metrics


def lengths_of(mask):
    return mask.sum(-1, keepdim=True).clamp(min=1).float()  # [B, 1]


# ---- golden values -------------------------------------------------------------------------------------------


def test_golden_sapo_loss():
    # Row 0: r = 2, 1 with A = 1 (tau 1); row 1: r = 0.5 with A = -1 (tau 1.05).
    old = torch.tensor([[-math.log(2.0) - 1.0, -1.0], [-1.0 + math.log(2.0), 0.0]])
    logprobs = torch.tensor([[-1.0, -1.0], [-1.0, 0.0]])
    mask = torch.tensor([[True, True], [True, False]])
    loss, _ = policy_loss(logprobs, old, torch.tensor([1.0, -1.0]), mask, "sapo")
    assert loss.item() == pytest.approx(-0.5230894134783215, abs=1e-6)


def test_golden_grpo_dapo_dr_grpo_losses():
    # r = 1.5 (A = 1) -> -1.2 ; r = 0.5 (A = -1) -> +0.8 ; r = 1.0 (A = -1) -> +1.0
    logprobs = torch.zeros(2, 3)
    old = torch.tensor([[-math.log(1.5), math.log(2.0), 0.0], [0.0, 0.0, 0.0]])
    advantages = torch.tensor([[1.0, -1.0, -1.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [False, False, False]])
    token_losses = -1.2 + 0.8 + 1.0
    assert policy_loss(logprobs, old, advantages, mask, "grpo")[0].item() == pytest.approx(token_losses / 3 / 2)
    dapo_losses = -1.28 + 0.8 + 1.0  # epsilon_high 0.28
    assert policy_loss(logprobs, old, advantages, mask, "dapo")[0].item() == pytest.approx(dapo_losses / 3)
    loss = policy_loss(logprobs, old, advantages, mask, "dr_grpo", max_completion_length=10)[0]
    assert loss.item() == pytest.approx(token_losses / (2 * 10))


def test_golden_gspo_loss():
    # Row 0: log s = mean(0.1, 0.3) = 0.2, A = 1 -> clipped to 1 + 4e-4; row 1: log s = -1e-4, A = -1 -> unclipped.
    logprobs = torch.zeros(2, 2)
    old = torch.tensor([[-0.1, -0.3], [1e-4, 0.0]])
    mask = torch.tensor([[True, True], [True, False]])
    loss, metrics = policy_loss(logprobs, old, torch.tensor([1.0, -1.0]), mask, "gspo")
    assert loss.item() == pytest.approx((-(1 + 4e-4) + math.exp(-1e-4)) / 2, abs=1e-6)
    assert metrics["clip/seq_high_frac"] == 0.5 and metrics["clip/seq_low_frac"] == 0.0


def test_golden_cispo_loss():
    logprobs = torch.tensor([[-1.0, -2.0]])
    old = torch.tensor([[-1.0, -4.0]])  # r = 1, e^2 (capped at 5)
    loss, metrics = policy_loss(logprobs, old, torch.tensor([2.0]), torch.ones(1, 2, dtype=torch.bool), "cispo")
    assert loss.item() == pytest.approx((-(1.0 * 2 * -1.0) - (5.0 * 2 * -2.0)) / 2)
    assert metrics["cispo/capped_frac"] == 0.5  # e^2 = 7.4 > 5
    loss, metrics = policy_loss(logprobs, old, torch.tensor([2.0]), torch.ones(1, 2), "cispo", epsilon_high=8.0)
    assert metrics["cispo/capped_frac"] == 0.0


def test_cispo_capped_fraction():
    logprobs, old = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, -2.0]])
    _, metrics = policy_loss(logprobs, old, torch.tensor([1.0]), torch.ones(1, 2), "cispo")
    assert metrics["cispo/capped_frac"] == 0.5


# ---- gradients against the analytic formulas ----------------------------------------------------------------


def test_sapo_gradient_matches_analytic():
    logprobs, old, advantages, mask = make_batch(spread=1.0)
    _, grad, _ = grad_of("sapo", logprobs, old, advantages, mask)
    ratio = torch.exp(logprobs.detach() - old)
    A = advantages.unsqueeze(-1)
    tau = torch.where(A > 0, 1.0, 1.05).expand_as(ratio)
    w = soft_gate_weight(ratio, tau)
    B = mask.shape[0]  # every row, including the empty one
    expected = torch.where(mask, -A * w * ratio / lengths_of(mask) / B, 0.0)
    assert torch.allclose(grad, expected, atol=1e-7)


def test_grpo_gradient_has_the_clip_indicator():
    logprobs, old, advantages, mask = make_batch(spread=0.5)
    _, grad, _ = grad_of("grpo", logprobs, old, advantages, mask)
    ratio = torch.exp(logprobs.detach() - old)
    A = advantages.unsqueeze(-1)
    clipped = ((ratio > 1.2) & (A > 0)) | ((ratio < 0.8) & (A < 0))
    assert clipped[mask].any() and (~clipped[mask]).any()
    expected = torch.where(mask & ~clipped, -A * ratio / lengths_of(mask) / mask.shape[0], 0.0)
    assert torch.allclose(grad, expected, atol=1e-7)


@pytest.mark.parametrize("loss_type", ["gspo", "gspo_token"])
def test_gspo_gradient_is_the_sequence_weight(loss_type):
    logprobs, old, advantages, mask = make_batch(spread=0.002)
    _, grad, _ = grad_of(loss_type, logprobs, old, advantages, mask)
    z = torch.where(mask, logprobs.detach() - old, 0.0)
    s = torch.exp(z.sum(-1, keepdim=True) / lengths_of(mask))  # [B, 1]
    A = advantages.unsqueeze(-1)
    clipped = ((s > 1 + 4e-4) & (A > 0)) | ((s < 1 - 3e-4) & (A < 0))
    expected = torch.where(mask & ~clipped, -A * s / lengths_of(mask) / mask.shape[0], 0.0)
    assert torch.allclose(grad, expected, atol=1e-7)


def test_cispo_gradient():
    logprobs, old, advantages, mask = make_batch(spread=2.0)
    _, grad, _ = grad_of("cispo", logprobs, old, advantages, mask, epsilon_high=1.5)
    weight = torch.exp(logprobs.detach() - old).clamp(max=1.5)
    expected = torch.where(mask, -weight * advantages.unsqueeze(-1) / mask.sum(), 0.0)
    assert torch.allclose(grad, expected, atol=1e-7)


@pytest.mark.parametrize("loss_type", ["sapo", "grpo", "gspo", "gspo_token", "dapo", "cispo"])
def test_on_policy_gradient_is_the_plain_policy_gradient(loss_type):
    logprobs, _, advantages, mask = make_batch()
    _, grad, _ = grad_of(loss_type, logprobs, logprobs.detach(), advantages, mask)
    A = advantages.unsqueeze(-1)
    if resolve(loss_type).aggregation == "token_mean":
        expected = torch.where(mask, -A / mask.sum(), 0.0)
    else:
        expected = torch.where(mask, -A / lengths_of(mask) / mask.shape[0], 0.0)
    assert torch.allclose(grad, expected, atol=1e-7)


@pytest.mark.parametrize("tau", [0.1, 1.0, 1.05, 5.0])
def test_on_policy_sapo_equals_grpo_for_any_tau(tau):
    """The 4/tau factor: without it the on-policy gradient would be tau/4 of GRPO's."""
    logprobs, _, advantages, mask = make_batch(seed=3)
    old = logprobs.detach()
    _, sapo_grad, _ = grad_of("sapo", logprobs, old, advantages, mask, tau_pos=tau, tau_neg=tau)
    _, grpo_grad, _ = grad_of("grpo", logprobs, old, advantages, mask)
    assert torch.allclose(sapo_grad, grpo_grad, atol=1e-7)


@pytest.mark.parametrize("loss_type", ["sapo", "grpo", "gspo", "cispo"])
def test_gradient_scales_with_the_advantage(loss_type):
    """Guards against a dropped '* A': the gradient is linear in A, sign included."""
    logprobs, old, advantages, mask = make_batch(seed=4, spread=0.0001)
    advantages = advantages.abs() + 0.5  # one sign, so the SAPO temperature is the same for both
    _, grad, _ = grad_of(loss_type, logprobs, old, advantages, mask)
    _, grad3, _ = grad_of(loss_type, logprobs, old, 3 * advantages, mask)
    assert grad.abs().sum() > 0
    assert torch.allclose(grad3, 3 * grad, atol=1e-6)


def test_tau_pos_for_positive_and_tau_neg_for_nonpositive_advantages():
    logprobs = torch.zeros(3, 1)
    old = torch.full((3, 1), -math.log(2.0))  # r = 2 everywhere
    mask = torch.ones(3, 1, dtype=torch.bool)
    advantages = torch.tensor([1.0, -1.0, 0.0])
    _, grad, _ = grad_of("sapo", logprobs, old, advantages, mask, tau_pos=1.0, tau_neg=3.0)
    w_pos = soft_gate_weight(torch.tensor(2.0), torch.tensor(1.0))
    w_neg = soft_gate_weight(torch.tensor(2.0), torch.tensor(3.0))
    assert grad[0, 0].item() == pytest.approx(-1.0 * w_pos.item() * 2 / 3, rel=1e-5)
    assert grad[1, 0].item() == pytest.approx(+1.0 * w_neg.item() * 2 / 3, rel=1e-5)
    assert grad[2, 0].item() == 0.0
    # tau for A == 0 is tau_neg: visible in the loss offset f(r) A = 0 either way, but in the gate metrics.
    _, metrics = policy_loss(logprobs, old, torch.tensor([0.0, 0.0, 0.0]), mask, "sapo", tau_pos=1.0, tau_neg=3.0)
    assert metrics["sapo/gate_mean"] == pytest.approx(w_neg.item(), rel=1e-5)


# ---- invariances ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ALL)
def test_padding_and_garbage_in_masked_slots_change_nothing(loss_type):
    logprobs, old, advantages, mask = make_batch(seed=5)
    ref = old - 0.1
    extra = {"beta": 0.05, "ref_logprobs": ref}
    if loss_type != "gspo":
        extra["token_weights"] = torch.rand(mask.shape)
    loss, grad, metrics = grad_of(loss_type, logprobs, old, advantages, mask, **extra)

    B, T = mask.shape
    pad = 4

    def widen(x, fill):
        wide = torch.full((B, T + pad), fill)
        wide[:, :T] = x.detach()
        return torch.where(torch.cat([mask, torch.zeros(B, pad, dtype=torch.bool)], 1), wide, fill)

    wide_mask = torch.cat([mask, torch.zeros(B, pad, dtype=torch.bool)], 1)
    wide_extra = {"beta": 0.05, "ref_logprobs": widen(ref, math.inf)}
    if "token_weights" in extra:
        wide_extra["token_weights"] = widen(extra["token_weights"], math.nan)
    wide_logprobs = widen(logprobs, math.nan)
    wide_loss, wide_grad, wide_metrics = grad_of(
        loss_type, wide_logprobs, widen(old, -math.inf), advantages, wide_mask, **wide_extra
    )
    # Equal up to the summation order of a wider reduction.
    assert wide_loss.item() == pytest.approx(loss.item(), rel=1e-6, abs=1e-8)
    assert torch.allclose(wide_grad[:, :T], grad, rtol=1e-6, atol=1e-9)
    assert torch.equal(wide_grad[:, T:], torch.zeros(B, pad))
    assert metrics.keys() == wide_metrics.keys()
    for name in metrics:
        assert metrics[name] == pytest.approx(wide_metrics[name], rel=1e-6, abs=1e-7, nan_ok=True), name


def test_per_token_advantages_nan_in_masked_slots():
    logprobs, old, advantages, mask = make_batch(seed=6)
    token_adv = advantages.unsqueeze(-1).expand(mask.shape).clone()
    loss, grad, _ = grad_of("sapo", logprobs, old, advantages, mask)
    token_adv[~mask] = math.nan
    loss_t, grad_t, _ = grad_of("sapo", logprobs, old, token_adv, mask)
    assert torch.equal(loss, loss_t) and torch.equal(grad, grad_t)


@pytest.mark.parametrize("loss_type", ALL)
def test_gradient_accumulation_equals_the_whole_batch(loss_type):
    logprobs, old, advantages, mask = make_batch(B=6, T=5, seed=7, spread=0.2 if loss_type != "gspo" else 1e-4)
    ref = old + 0.2
    extra = {"beta": 0.1, "ref_logprobs": ref}
    loss, grad, _ = grad_of(loss_type, logprobs, old, advantages, mask, **extra)
    total, grads = 0.0, []
    for rows in (slice(0, 2), slice(2, 6)):
        part_loss, part_grad, _ = grad_of(
            loss_type, logprobs[rows], old[rows], advantages[rows], mask[rows],
            beta=0.1, ref_logprobs=ref[rows], num_sequences=6, num_tokens=int(mask.sum()),
        )
        total = total + part_loss
        grads.append(part_grad)
    assert total.item() == pytest.approx(loss.item(), rel=1e-6, abs=1e-7)
    assert torch.allclose(torch.cat(grads), grad, atol=1e-8)


@pytest.mark.parametrize("loss_type", ALL)
def test_extreme_log_ratios_are_finite(loss_type):
    logprobs = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    old = torch.tensor([[50.0, -50.0, 0.0], [-50.0, 50.0, 0.0]])
    advantages = torch.tensor([1.0, -1.0])
    loss, grad, metrics = grad_of(loss_type, logprobs, old, advantages, torch.ones(2, 3, dtype=torch.bool))
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert math.isfinite(metrics["ratio/max"]) and metrics["log_ratio/q99"] == 20.0


def test_sequence_loss_is_not_weighted_by_length():
    # Two sequences, lengths 1 and 6, every token log-ratio equal within a row.
    logprobs = torch.zeros(2, 6)
    old = torch.tensor([[-1e-4] * 6, [2e-4] * 6])
    mask = torch.tensor([[True] + [False] * 5, [True] * 6])
    advantages = torch.tensor([1.0, 1.0])
    loss, _ = policy_loss(logprobs, old, advantages, mask, "gspo")
    per_sequence = [-math.exp(1e-4), -math.exp(-2e-4)]
    assert loss.item() == pytest.approx(sum(per_sequence) / 2, rel=1e-6)


def test_bf16_inputs_use_float32_math():
    logprobs, old, advantages, mask = make_batch(seed=8)
    low = logprobs.detach().bfloat16().requires_grad_()
    loss, _ = policy_loss(low, old.bfloat16(), advantages, mask, "sapo")
    reference, _ = policy_loss(low.detach().float(), old.bfloat16().float(), advantages, mask, "sapo")
    assert loss.dtype == torch.float32
    assert loss.item() == reference.item()
    loss.backward()
    assert low.grad.dtype == torch.bfloat16 and torch.isfinite(low.grad.float()).all()


# ---- token_loss / aggregation_weights contract (used by the fused ops head) ----------------------------------


@pytest.mark.parametrize("loss_type", TOKEN_LEVEL)
def test_token_loss_times_weights_is_policy_loss(loss_type):
    logprobs, old, advantages, mask = make_batch(seed=9, empty_row=False)
    spec = resolve(loss_type, **options_for(loss_type))
    token_adv = advantages.unsqueeze(-1).expand(mask.shape)
    per_token = token_loss(logprobs, old, token_adv, spec)
    assert per_token.shape == logprobs.shape and per_token.dtype == torch.float32
    weights = aggregation_weights(mask, spec, num_sequences=9, num_tokens=40)
    fused = (per_token * weights).sum()
    loss, metrics = policy_loss(logprobs, old, advantages, mask, loss_type, num_sequences=9, num_tokens=40,
                                **options_for(loss_type))
    assert torch.equal(fused, loss)
    assert metrics["loss/policy"] == loss.item()
    (fused_grad,) = torch.autograd.grad(fused, logprobs)
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert torch.allclose(fused_grad, grad, atol=1e-9)


def test_token_loss_formulas():
    logprobs = torch.tensor([[-1.0, -2.0]])
    old = torch.tensor([[-1.0 - math.log(2.0), -2.0]])  # r = 2, 1
    advantages = torch.tensor([[1.0, -2.0]])
    sapo = token_loss(logprobs, old, advantages, resolve("sapo"))
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert torch.allclose(sapo, torch.tensor([[-4 * sigmoid(1.0), 2 * 2 / 1.05]]))
    grpo = token_loss(logprobs, old, advantages, resolve("grpo"))
    assert torch.allclose(grpo, torch.tensor([[-1.2, 2.0]]))
    cispo = token_loss(logprobs, old, advantages, resolve("cispo"))
    assert torch.allclose(cispo, torch.tensor([[2.0 * 1 * -1.0 * -1, -(1.0 * -2.0 * -2.0)]]))
    plain = token_loss(logprobs, old, advantages, resolve("grpo", shaping="none"))
    assert torch.allclose(plain, torch.tensor([[-2.0, 2.0]]))


@pytest.mark.parametrize("loss_type", ["gspo", "gspo_token"])
def test_token_loss_rejects_sequence_level(loss_type):
    with pytest.raises(ValueError, match="policy_loss"):
        token_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), resolve(loss_type))


# ---- KL, token weights ---------------------------------------------------------------------------------------


def test_kl_term_is_added_with_the_policy_aggregation():
    logprobs, old, advantages, mask = make_batch(seed=10)
    ref = old - 0.3
    base, _ = policy_loss(logprobs, old, advantages, mask, "dapo")
    loss, metrics = policy_loss(logprobs, old, advantages, mask, "dapo", beta=0.5, ref_logprobs=ref, kl_estimator="k1")
    k1 = torch.where(mask, logprobs - ref, 0.0)
    kl = (k1.sum() / mask.sum()).item()
    assert loss.item() == pytest.approx(base.item() + 0.5 * kl, rel=1e-5)
    assert metrics["loss/kl"] == pytest.approx(0.5 * kl, rel=1e-5)
    assert metrics["kl/mean"] == pytest.approx(kl, rel=1e-5)
    assert metrics["loss/total"] == pytest.approx(loss.item())


def test_token_weights_multiply_the_policy_term():
    logprobs, old, advantages, mask = make_batch(seed=11)
    spec = resolve("sapo")
    weights = torch.rand(mask.shape)
    loss, _ = policy_loss(logprobs, old, advantages, mask, "sapo", token_weights=weights)
    per_token = token_loss(torch.where(mask, logprobs, 0.0), torch.where(mask, old, 0.0),
                           advantages.unsqueeze(-1).expand(mask.shape), spec)
    expected = (per_token * weights * aggregation_weights(mask, spec)).sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


# ---- errors --------------------------------------------------------------------------------------------------


def test_call_errors():
    logprobs, old, advantages, mask = make_batch()
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        policy_loss(logprobs, old, advantages, mask, "sapo", beta=0.1)
    with pytest.raises(ValueError, match="max_completion_length"):
        policy_loss(logprobs, old, advantages, mask, "dr_grpo")
    with pytest.raises(ValueError, match="allowed: sapo"):
        policy_loss(logprobs, old, advantages, mask, "reinforce")
    with pytest.raises(ValueError, match="unknown option"):
        policy_loss(logprobs, old, advantages, mask, "sapo", clip_ratio=0.2)
    with pytest.raises(ValueError, match="gspo_token"):
        policy_loss(logprobs, old, advantages.unsqueeze(-1).expand(mask.shape), mask, "gspo")
    with pytest.raises(ValueError, match="advantages must be"):
        policy_loss(logprobs, old, advantages[:2], mask, "sapo")
    with pytest.raises(ValueError, match="mask must have"):
        policy_loss(logprobs, old, advantages, mask[:, :2], "sapo")
    with pytest.raises(ValueError, match="token_weights"):
        policy_loss(logprobs, old, advantages, mask, "gspo", token_weights=torch.ones(mask.shape))


@pytest.mark.parametrize("loss_type", ALL)
def test_metric_keys_are_the_documented_names(loss_type):
    logprobs, old, advantages, mask = make_batch(seed=12)
    _, _, metrics = grad_of(loss_type, logprobs, old, advantages, mask, beta=0.1, ref_logprobs=old)
    assert list(metrics) == metric_names(loss_type, beta=0.1, **options_for(loss_type))
    assert all(type(value) is float for value in metrics.values())
    _, empty = policy_loss(logprobs, old, advantages, mask, loss_type, with_metrics=False, **options_for(loss_type))
    assert empty == {}


@pytest.mark.parametrize("loss_type", ["sapo", "gspo", "cispo"])
def test_nan_at_a_real_token_makes_the_loss_nan(loss_type):
    logprobs, old, advantages, mask = make_batch(seed=13)
    logprobs = logprobs.detach().clone()
    logprobs[0, 0] = math.nan  # mask[0] is all True
    loss, _ = policy_loss(logprobs, old, advantages, mask, loss_type, with_metrics=False)
    assert math.isnan(loss.item())


def test_nan_in_real_advantages_reference_or_token_weights_makes_the_loss_nan():
    logprobs, old, advantages, mask = make_batch(seed=14)
    bad = torch.zeros(mask.shape)
    bad[0, 0] = math.nan  # mask[0] is all True
    token_adv = advantages.unsqueeze(-1).expand(mask.shape) + bad
    assert math.isnan(policy_loss(logprobs, old, token_adv, mask, "sapo")[0].item())
    assert math.isnan(policy_loss(logprobs, old, advantages, mask, "sapo", token_weights=1 + bad)[0].item())
    assert math.isnan(policy_loss(logprobs, old, advantages, mask, "sapo", beta=0.1, ref_logprobs=old + bad)[0].item())


@pytest.mark.parametrize("loss_type", ["sapo", "grpo", "cispo"])
def test_clamp_bound_gradients_match_token_loss(loss_type):
    """The masked clamp in policy_loss passes gradients exactly like torch.clamp in token_loss."""
    logprobs = torch.zeros(1, 5, requires_grad=True)
    old = torch.tensor([[-20.0, 20.0, -25.0, 0.1, 19.0]])  # log r = 20, -20, 25, -0.1, -19
    advantages, mask = torch.tensor([0.5]), torch.ones(1, 5, dtype=torch.bool)
    spec = resolve(loss_type)
    fused = (token_loss(logprobs, old, advantages, spec) * aggregation_weights(mask, spec)).sum()
    (expected,) = torch.autograd.grad(fused, logprobs)
    loss, _ = policy_loss(logprobs, old, advantages, mask, loss_type)
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert torch.equal(grad, expected)
