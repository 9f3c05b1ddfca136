"""Importance ratios between the current policy pi_theta and the behaviour policy pi_old.

Three levels (the `ratio_level` axis of a LossSpec):
  token           r_{i,t} = pi_theta(y_t) / pi_old(y_t) = exp(logp - old_logp)          (GRPO, SAPO, CISPO)
  sequence        s_i = exp(mean_t log r_{i,t})                                        (GSPO eq. 7)
  sequence_token  s_{i,t} = sg[s_i] * pi_theta(y_t) / sg[pi_theta(y_t)]                (GSPO-token eq. 13)
All math is float32 whatever the input dtype, and every log-ratio is clamped to
[-log_ratio_clamp, log_ratio_clamp] before exp, so exp never overflows.
"""

from __future__ import annotations

import torch

from sapo.objectives.axes import RATIO_LEVELS  # noqa: F401  (the level names, defined without torch)
from sapo.objectives.masking import masked_finite


def token_log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, clamp: float) -> torch.Tensor:
    """z_{i,t} = clamp(logp - old_logp) in float32, [B, T]. Gradient flows through `logprobs` only."""
    return (logprobs.float() - old_logprobs.detach().float()).clamp(-clamp, clamp)


def masked_token_log_ratio(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor, clamp: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """token_log_ratio, exactly 0 (value and gradient) at masked positions whatever they held, plus a
    [] bool flag for a NaN at an unmasked position (masking.py). `mask` is the float 0/1 mask."""
    return masked_finite(logprobs.float() - old_logprobs.detach().float(), mask, clamp, owned=True)


def sequence_log_ratio(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log s_i = (1/|y_i|) sum_t z_{i,t}, [B]; |y_i| clamped to >= 1, so an empty row gives 0 (s_i = 1).

    `log_ratio` must already be exactly zero at masked positions; `mask` is the float 0/1 mask.
    """
    lengths = mask.sum(-1).clamp(min=1)  # [B]
    return log_ratio.sum(-1) / lengths  # [B]


def sequence_token_ratio(logprobs: torch.Tensor, seq_log_ratio: torch.Tensor) -> torch.Tensor:
    """s_{i,t} = sg[s_i] * exp(logp - sg[logp]), [B, T]: value s_i, d s_{i,t} / d logp_{i,t} = s_i."""
    logp = logprobs.float()  # [B, T]
    return torch.exp(seq_log_ratio.detach().unsqueeze(-1) + (logp - logp.detach()))
