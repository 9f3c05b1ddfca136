import math

import pytest
import torch

from sapo.objectives.kl import token_kl


def test_k1_and_k3_values():
    logp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    delta = [-0.5, 1.0]
    assert torch.allclose(token_kl(logp, ref, "k1"), torch.tensor([[0.5, -1.0]]))
    expected = [[math.exp(d) - d - 1 for d in delta]]
    assert torch.allclose(token_kl(logp, ref, "k3"), torch.tensor(expected))


def test_k3_is_nonnegative_and_zero_on_reference():
    logp = torch.randn(4, 5)
    assert (token_kl(logp, logp + torch.randn(4, 5), "k3") >= 0).all()
    assert token_kl(logp, logp, "k3").abs().max() == 0


def test_k3_gradient_and_clamp():
    logp = torch.tensor([[-1.0, -100.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, 0.0]])
    kl = token_kl(logp, ref, "k3", clamp=20.0)
    assert torch.isfinite(kl).all()
    kl.sum().backward()
    # d/dlogp [e^d - d - 1] with d = ref - logp: 1 - e^d; the clamped slot has no gradient.
    assert logp.grad[0, 0].item() == pytest.approx(1 - math.exp(-0.5))
    assert logp.grad[0, 1].item() == 0.0


def test_unknown_estimator():
    with pytest.raises(ValueError, match="k1, k3"):
        token_kl(torch.zeros(1, 1), torch.zeros(1, 1), "k2")
