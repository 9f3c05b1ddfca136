"""Per-token estimators of KL(pi_theta || pi_ref) from the sampled tokens (Schulman, "Approximating KL").

With d = log pi_ref(y_t) - log pi_theta(y_t) (clamped like every log-ratio, float32):
  k1 = -d                    unbiased, can be negative
  k3 = exp(d) - d - 1        unbiased, always >= 0 (the GRPO paper's choice; default)
"""

from __future__ import annotations

import torch

from sapo.objectives.axes import KL_ESTIMATORS


def token_kl(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3", clamp: float = 20.0
) -> torch.Tensor:
    """[B, T] float32 per-token KL estimate; gradient flows through `logprobs` only."""
    delta = (ref_logprobs.detach().float() - logprobs.float()).clamp(-clamp, clamp)  # [B, T]
    if estimator == "k1":
        return -delta
    if estimator == "k3":
        return torch.exp(delta) - delta - 1.0
    raise ValueError(f"unknown kl_estimator {estimator!r}; allowed: {', '.join(KL_ESTIMATORS)}")
