"""Property tests of policy_loss over random shapes, masks and values."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sapo.objectives import aggregation_weights, metric_names, policy_loss, resolve, token_loss
from sapo.objectives.shaping import soft_gate_weight

PRESETS = ["sapo", "grpo", "dapo", "dr_grpo", "gspo", "gspo_token", "cispo"]


@st.composite
def batches(draw):
    B = draw(st.integers(1, 4))
    T = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    spread = draw(st.sampled_from([0.0, 1e-3, 0.3, 3.0, 60.0]))
    gen = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(B, T, generator=gen) * 5
    old = logprobs + spread * torch.randn(B, T, generator=gen)
    advantages = torch.randn(B, generator=gen) * draw(st.sampled_from([0.0, 1.0, 100.0]))
    mask = torch.rand(B, T, generator=gen) < draw(st.sampled_from([0.0, 0.5, 1.0]))
    return logprobs, old, advantages, mask


def run(loss_type, logprobs, old, advantages, mask, **options):
    if loss_type == "dr_grpo":
        options["max_completion_length"] = 8
    logprobs = logprobs.clone().requires_grad_()
    loss, metrics = policy_loss(logprobs, old, advantages, mask, loss_type, **options)
    loss.backward()
    return loss.detach(), logprobs.grad, metrics


@settings(max_examples=40, deadline=None)
@given(batches(), st.sampled_from(PRESETS))
def test_finite_masked_and_named(batch, loss_type):
    logprobs, old, advantages, mask = batch
    loss, grad, metrics = run(loss_type, logprobs, old, advantages, mask)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert (grad[~mask] == 0).all()
    assert list(metrics) == metric_names(loss_type, max_completion_length=8 if loss_type == "dr_grpo" else None)
    if not mask.any():
        assert loss.item() == 0.0


@settings(max_examples=40, deadline=None)
@given(batches())
def test_sapo_gradient_is_analytic(batch):
    logprobs, old, advantages, mask = batch
    _, grad, _ = run("sapo", logprobs, old, advantages, mask)
    log_ratio = (logprobs - old).clamp(-20, 20)
    inside = log_ratio.abs() < 20  # the clamp stops the gradient outside
    ratio = torch.exp(log_ratio)
    A = advantages.unsqueeze(-1).expand_as(ratio)
    w = soft_gate_weight(ratio, torch.where(A > 0, 1.0, 1.05))
    lengths = mask.sum(-1, keepdim=True).clamp(min=1)
    expected = torch.where(mask & inside, -A * w * ratio / lengths / mask.shape[0], 0.0)
    assert torch.allclose(grad, expected, rtol=1e-5, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(batches(), st.sampled_from(["sapo", "grpo", "dapo", "dr_grpo", "cispo"]))
def test_token_loss_times_weights_is_policy_loss(batch, loss_type):
    logprobs, old, advantages, mask = batch
    spec = resolve(loss_type, max_completion_length=8 if loss_type == "dr_grpo" else None)
    clean = torch.where(mask, logprobs, 0.0), torch.where(mask, old, 0.0)
    per_token = token_loss(*clean, advantages.unsqueeze(-1).expand(mask.shape), spec)
    fused = (per_token * aggregation_weights(mask, spec)).sum()
    loss, _, _ = run(loss_type, logprobs, old, advantages, mask)
    assert torch.equal(fused, loss)


@settings(max_examples=30, deadline=None)
@given(batches(), st.sampled_from(PRESETS), st.integers(0, 4))
def test_split_with_global_normalisers_equals_whole(batch, loss_type, cut):
    logprobs, old, advantages, mask = batch
    cut = min(cut, mask.shape[0])
    loss, grad, _ = run(loss_type, logprobs, old, advantages, mask)
    total, grads = torch.tensor(0.0), []
    for rows in (slice(0, cut), slice(cut, None)):
        part, part_grad, _ = run(loss_type, logprobs[rows], old[rows], advantages[rows], mask[rows],
                                 num_sequences=mask.shape[0], num_tokens=int(mask.sum()))
        total, grads = total + part, grads + [part_grad]
    assert torch.allclose(total, loss, rtol=1e-5, atol=1e-5 * (1 + advantages.abs().max().item()))
    assert torch.allclose(torch.cat(grads), grad, rtol=1e-5, atol=1e-7)
