import math

import pytest
import torch

from sapo.objectives import resolve
from sapo.objectives.shaping import (
    cispo,
    cispo_cap,
    clip,
    soft_gate,
    soft_gate_value,
    soft_gate_weight,
    temperatures,
)

# SAPO eq. 6 gate w(r) = sech^2(tau (r - 1) / 2), 5 decimals (docs/SAPO.md).
GOLDEN_GATE = {
    1.0: {0.5: 0.94001, 0.8: 0.99007, 1.0: 1.0, 1.2: 0.99007, 1.5: 0.94001, 2.0: 0.78645, 3.0: 0.41997,
          5.0: 0.07065, 10.0: 0.00049},
    1.05: {0.5: 0.93414, 0.8: 0.98906, 2.0: 0.76811, 3.0: 0.38878, 5.0: 0.05822},
}


@pytest.mark.parametrize("tau", sorted(GOLDEN_GATE))
def test_gate_golden_values(tau):
    ratios = torch.tensor(list(GOLDEN_GATE[tau]))
    expected = torch.tensor(list(GOLDEN_GATE[tau].values()))
    gate = soft_gate_weight(ratios, torch.full_like(ratios, tau))
    assert torch.allclose(gate, expected, atol=5e-6, rtol=0)


@pytest.mark.parametrize("tau", sorted(GOLDEN_GATE))
def test_gate_is_derivative_of_f(tau):
    ratio = torch.tensor(list(GOLDEN_GATE[tau]), dtype=torch.float64, requires_grad=True)
    tau_t = torch.full_like(ratio, tau)
    (grad,) = torch.autograd.grad(soft_gate_value(ratio, tau_t).sum(), ratio)
    assert torch.allclose(grad, soft_gate_weight(ratio.detach(), tau_t), atol=1e-12)


def test_f_at_one_is_two_over_tau_and_gate_one():
    for tau in (0.3, 1.0, 1.05, 4.0):
        one, tau_t = torch.tensor([1.0]), torch.tensor([tau])
        assert soft_gate_value(one, tau_t).item() == pytest.approx(2 / tau)
        assert soft_gate_weight(one, tau_t).item() == 1.0


def test_gate_times_ratio_peaks_near_1_57():
    ratio = torch.linspace(0.01, 10, 100_000, dtype=torch.float64)
    coefficient = soft_gate_weight(ratio, torch.ones_like(ratio)) * ratio
    assert coefficient.max().item() == pytest.approx(1.5747, abs=1e-3)
    assert ratio[coefficient.argmax()].item() == pytest.approx(2.06, abs=0.01)


def test_temperatures_follow_the_sign_of_the_advantage():
    advantages = torch.tensor([2.0, 0.0, -1.0])
    assert temperatures(advantages, 0.5, 3.0).tolist() == [0.5, 3.0, 3.0]


def test_soft_gate_loss_value():
    spec = resolve("sapo")
    ratio, advantages = torch.tensor([2.0, 0.5]), torch.tensor([1.0, -1.0])
    loss = soft_gate(ratio, advantages, None, spec)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = [-sigmoid(1.0) * 4, sigmoid(-0.525) * 4 / 1.05]
    assert torch.allclose(loss, torch.tensor(expected), atol=1e-6)


def test_clip_loss_values():
    spec = resolve("grpo", epsilon_low=0.2, epsilon_high=0.3)
    ratio = torch.tensor([1.5, 0.5, 1.5, 0.5, 1.1])
    advantages = torch.tensor([1.0, -1.0, -1.0, 1.0, 2.0])
    # A > 0 caps at 1.3; A < 0 floors at 0.8; the pessimistic min keeps r otherwise.
    expected = torch.tensor([-1.3, 0.8, 1.5, -0.5, -2.2])
    assert torch.allclose(clip(ratio, advantages, None, spec), expected)


def test_cispo_cap_conventions():
    assert cispo_cap(resolve("cispo")) == 5.0
    assert cispo_cap(resolve("cispo", epsilon_high=2.0)) == 2.0
    assert cispo_cap(resolve("cispo", cispo_cap_mode="relative", epsilon_high=0.28)) == pytest.approx(1.28)


def test_cispo_weight_is_detached_and_capped():
    spec = resolve("cispo", epsilon_high=2.0)
    logp = torch.tensor([-1.0, -2.0], requires_grad=True)
    ratio = torch.exp(logp - torch.tensor([-1.5, -4.0]))  # e^0.5, e^2 > cap
    advantages = torch.tensor([1.0, 1.0])
    loss = cispo(ratio, advantages, logp, spec)
    assert torch.allclose(loss.detach(), torch.tensor([math.exp(0.5) * 1.0, 2.0 * 2.0]), atol=1e-6)
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    assert torch.allclose(grad, torch.tensor([-math.exp(0.5), -2.0]), atol=1e-6)
