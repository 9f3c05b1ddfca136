import pytest
import torch

from sapo.objectives import aggregation_weights, policy_loss, resolve
from sapo.ops import fused_token_policy_loss

B, T, D, V = 4, 9, 16, 40
OPTIONS = {"dr_grpo": dict(max_completion_length=12)}


def make_batch(seed=0, temperature=1.0):
    """A [B, T] completion batch with its flattened hidden states, labels and old log-probs near the current ones."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B * T, D, generator=gen)  # [N, d]
    weight = torch.randn(V, D, generator=gen) / 2  # [V, d]
    labels = torch.randint(0, V, (B * T,), generator=gen)  # [N]
    mask = torch.rand(B, T, generator=gen) > 0.3  # [B, T]
    mask[0] = True
    mask[1, 5:] = False  # a short row
    advantages = torch.randn(B, generator=gen)  # [B]
    with torch.no_grad():
        logp = torch.log_softmax(hidden.double() @ weight.double().T / temperature, -1)
        logp = logp.gather(1, labels[:, None]).view(B, T)  # [B, T]
    old_logprobs = (logp + 0.4 * torch.randn(B, T, generator=gen, dtype=torch.float64)).float()  # ratios ~ e^N(0, .4)
    return hidden, weight, labels, mask, advantages, old_logprobs


def fused(hidden, weight, labels, mask, advantages, old_logprobs, loss_type, temperature=1.0, chunk_size=None,
          with_entropy=False, scale=1.0):
    spec = resolve(loss_type, **OPTIONS.get(loss_type, {}))
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    token_weights = aggregation_weights(mask, spec).reshape(-1)  # [N]
    token_advantages = advantages[:, None].expand(B, T).reshape(-1)  # [N]
    loss, logp, entropy = fused_token_policy_loss(
        h, w, labels, old_logprobs.reshape(-1), token_advantages, token_weights, spec,
        temperature=temperature, chunk_size=chunk_size, with_entropy=with_entropy,
    )
    (loss * scale).backward()
    return loss, logp, entropy, h.grad, w.grad


def plain_loss(hidden, weight, labels, mask, advantages, old_logprobs, loss_type, temperature=1.0):
    """Full float64 logits -> log_softmax -> gather -> objectives.policy_loss."""
    h = hidden.double().requires_grad_(True)
    w = weight.double().requires_grad_(True)
    log_probs = torch.log_softmax(h @ w.T / temperature, -1)  # [N, V]
    logp = log_probs.gather(1, labels[:, None]).view(B, T)  # [B, T]
    loss, _ = policy_loss(logp, old_logprobs, advantages, mask, loss_type, with_metrics=False,
                          **OPTIONS.get(loss_type, {}))
    loss.backward()
    entropy = -(log_probs.exp() * log_probs).sum(-1)  # [N]
    return loss, logp.reshape(-1), entropy, h.grad, w.grad


@pytest.mark.parametrize("loss_type", ["sapo", "grpo", "dapo", "cispo", "dr_grpo"])
@pytest.mark.parametrize("chunk_size, temperature", [(None, 1.0), (5, 1.0), (7, 0.7)])
def test_loss_and_grads_match_plain_path_with_policy_loss(loss_type, chunk_size, temperature):
    batch = make_batch(temperature=temperature)
    loss, logp, entropy, grad_h, grad_w = fused(*batch, loss_type, temperature, chunk_size, with_entropy=True)
    ref_loss, ref_logp, ref_entropy, ref_h, ref_w = plain_loss(*batch, loss_type, temperature)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss.double(), ref_loss.detach().double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logp.double(), ref_logp.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_entropy.detach(), rtol=1e-5, atol=1e-5)
    assert ref_h.abs().max() > 1e-3  # the objective really produces a gradient here
    torch.testing.assert_close(grad_h.double(), ref_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_w.double(), ref_w, rtol=1e-5, atol=1e-6)


def test_outputs_are_detached_and_grad_scales_with_upstream():
    batch = make_batch()
    loss, logp, entropy, grad_h, grad_w = fused(*batch, "sapo")
    assert not logp.requires_grad and entropy is None
    _, _, _, grad_h3, grad_w3 = fused(*batch, "sapo", scale=-3.0)
    torch.testing.assert_close(grad_h3, -3.0 * grad_h)
    torch.testing.assert_close(grad_w3, -3.0 * grad_w)


def test_autocast_does_not_round_the_logits():
    batch = make_batch()
    reference = fused(*batch, "sapo", chunk_size=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = fused(*batch, "sapo", chunk_size=8)
    for name, a, b in zip(["loss", "logp", "entropy", "d hidden", "d weight"], autocast, reference):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_nan_at_masked_positions_does_not_leak():
    hidden, weight, labels, mask, advantages, old_logprobs = make_batch()
    poisoned = torch.where(mask, old_logprobs, torch.nan)
    loss, _, _, grad_h, grad_w = fused(hidden, weight, labels, mask, advantages, poisoned, "grpo", chunk_size=4)
    ref = fused(hidden, weight, labels, mask, advantages, old_logprobs, "grpo", chunk_size=4)
    assert torch.isfinite(loss) and torch.isfinite(grad_h).all() and torch.isfinite(grad_w).all()
    torch.testing.assert_close(loss, ref[0])
    torch.testing.assert_close(grad_h, ref[3])
    assert (grad_h.view(B, T, D)[~mask] == 0).all()  # masked tokens' hidden states get no gradient


def test_no_grad_gives_the_same_loss():
    hidden, weight, labels, mask, advantages, old_logprobs = make_batch()
    spec = resolve("dapo")
    args = (labels, old_logprobs.reshape(-1), advantages[:, None].expand(B, T).reshape(-1),
            aggregation_weights(mask, spec).reshape(-1), spec)
    h = hidden.clone().requires_grad_(True)
    with torch.no_grad():
        loss, logp, _ = fused_token_policy_loss(h, weight, *args, chunk_size=8)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, fused_token_policy_loss(h, weight, *args, chunk_size=8)[0].detach())


def test_spec_by_name_and_frozen_weight():
    hidden, weight, labels, mask, advantages, old_logprobs = make_batch()
    spec = resolve("sapo")
    token_weights = aggregation_weights(mask, spec).reshape(-1)
    adv = advantages[:, None].expand(B, T).reshape(-1)
    h = hidden.clone().requires_grad_(True)
    loss, _, _ = fused_token_policy_loss(h, weight, labels, old_logprobs.reshape(-1), adv, token_weights, "sapo")
    loss.backward()
    ref = fused(hidden, weight, labels, mask, advantages, old_logprobs, "sapo")
    torch.testing.assert_close(loss, ref[0])
    torch.testing.assert_close(h.grad, ref[3])
    assert weight.grad is None


@pytest.mark.parametrize(
    "spec, message",
    [("gspo", "token-level objective"), ("gspo_token", "token-level objective"),
     (resolve("grpo", beta=0.1), "no KL term")],
)
def test_non_token_objectives_and_kl_are_refused(spec, message):
    hidden, weight, labels, mask, advantages, old_logprobs = make_batch()
    flat = torch.zeros(B * T)
    with pytest.raises(ValueError, match=message):
        fused_token_policy_loss(hidden, weight, labels, flat, flat, flat, spec)


def test_flat_shapes_are_checked():
    hidden, weight, labels, mask, advantages, old_logprobs = make_batch()
    flat = torch.zeros(B * T)
    with pytest.raises(ValueError, match="old_logprobs must be flat"):
        fused_token_policy_loss(hidden, weight, labels, old_logprobs, flat, flat, "sapo")
