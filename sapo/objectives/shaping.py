"""How the ratio turns into a per-token (or per-sequence) loss: the `shaping` axis of a LossSpec.

Every shaping function has the same signature, elementwise over any shape:
    shape(ratio, advantages, logprobs, spec) -> loss      (loss = -objective, float32)
`ratio` is r (token), s_i (sequence) or s_{i,t} (sequence_token); `advantages` broadcasts against it;
`logprobs` (float32, the ratio's shape) is given only to a shaping that declares it consumes "logprobs"
(CISPO), else it is None. presets.py registers each one with what it consumes (registry.py); a new one is
one function plus one `register_shaping` call, in the library or in user code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sapo.objectives.presets import LossSpec


def temperatures(advantages: torch.Tensor, tau_pos: float, tau_neg: float) -> torch.Tensor:
    """tau = tau_pos where A > 0, else tau_neg (A == 0 takes tau_neg; its loss term is 0 anyway)."""
    return torch.where(advantages > 0, tau_pos, tau_neg)


def soft_gate_value(ratio: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """f(r) = sigmoid(tau (r - 1)) * 4 / tau  (SAPO eq. 5); f(1) = 2 / tau."""
    return torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)


def soft_gate_weight(ratio: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """w = df/dr = 4 p (1 - p) = sech^2(tau (r - 1) / 2), p = sigmoid(tau (r - 1)) (SAPO eq. 6); w(1) = 1."""
    p = torch.sigmoid(tau * (ratio - 1.0))
    return 4.0 * p * (1.0 - p)


def soft_gate(ratio, advantages, logprobs, spec: LossSpec) -> torch.Tensor:
    """SAPO: -f(r) A = -sigmoid(tau (r - 1)) (4 / tau) A; gradient wrt logp = -A w r."""
    tau = temperatures(advantages, spec.tau_pos, spec.tau_neg)  # shape of advantages ([B, 1] per sequence)
    coefficient = -(4.0 / tau) * advantages  # folded before touching the [B, T] tensor
    return torch.sigmoid(tau * (ratio - 1.0)) * coefficient


def clip(ratio, advantages, logprobs, spec: LossSpec) -> torch.Tensor:
    """PPO/GRPO: -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)."""
    clipped = ratio.clamp(1.0 - spec.epsilon_low, 1.0 + spec.epsilon_high)
    negative = -advantages  # -min(x, y) = max(-x, -y), with the sign on the (small) advantage tensor
    return torch.maximum(ratio * negative, clipped * negative)


def cispo_cap(spec: LossSpec) -> float:
    """Upper cap on the CISPO weight: epsilon_high itself (TRL, default 5.0) or 1 + epsilon_high (verl, slime)."""
    return spec.epsilon_high if spec.cispo_cap_mode == "absolute" else 1.0 + spec.epsilon_high


def cispo(ratio, advantages, logprobs, spec: LossSpec) -> torch.Tensor:
    """CISPO (MiniMax-M1): -sg[min(r, cap)] A logp; the gradient flows through logp, never through the weight."""
    weight = ratio.detach().clamp(max=cispo_cap(spec)).mul_(-advantages)  # sg[min(r, cap)] * -A, no graph
    return weight * logprobs


def unshaped(ratio, advantages, logprobs, spec: LossSpec) -> torch.Tensor:
    """Plain importance-weighted policy gradient: -r A."""
    return ratio * -advantages
