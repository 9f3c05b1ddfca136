"""Correcting for the policy that really sampled: importance weights pi_old / pi_sampler.

pi_old is the trainer's own forward of the weights the updates start from; pi_sampler is what the
rollout engine reported for the same tokens. They differ by numerics (another engine, bf16 kernels,
docs/performance.md) and, under max_staleness, by the weights themselves (the sampler lagged). The
per-token weight multiplies each token's loss (detached), after one of four rules:

    token_truncate     w_t = min(r_t, cap)                      truncated IS (TIS)
    token_mask         w_t = r_t if min_ratio <= r_t <= cap else 0   (two-sided: IcePop's token mask)
    sequence_truncate  w_t = min(R_i, cap)                      R_i = prod_t r_t (one weight per sequence)
    sequence_mask      w_t = R_i if min_ratio <= R_i <= cap else 0   (TRL's sequence_mask)

with r_t = pi_old(y_t) / pi_sampler(y_t). min_ratio = 0 leaves the lower side open.
"""

from __future__ import annotations

import torch

MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
LOG_RATIO_CLAMP = 20.0  # |log r| bound before exp (a product over a long sequence overflows otherwise)


def sampler_is_weights(old_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor, *,
                       mode: str = "token_truncate", cap: float, min_ratio: float = 0.0
                       ) -> tuple[torch.Tensor, dict[str, float]]:
    """Detached weights [B, T] (0 where masked) and their diagnostics. All inputs [B, T]."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: choose one of {', '.join(MODES)}")
    if not cap > 0 or not 0 <= min_ratio < cap:
        raise ValueError(f"need 0 <= min_ratio < cap, got min_ratio={min_ratio}, cap={cap}")
    mask = mask.bool()
    # [B, T] log r, 0 where masked (never NaN: masked slots are selected away, not multiplied)
    log_ratio = torch.where(mask, old_logprobs.detach().float() - sampler_logprobs.detach().float(), 0.0)
    if mode.startswith("sequence"):
        log_ratio = log_ratio.sum(dim=-1, keepdim=True).expand_as(log_ratio)  # log R_i on every token of row i
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    if mode.endswith("truncate"):
        outside = ratio > cap
        weights = ratio.clamp(max=cap)
    else:
        outside = (ratio > cap) | (ratio < min_ratio)
        weights = torch.where(outside, 0.0, ratio)
    weights = torch.where(mask, weights, 0.0)
    count = mask.sum().clamp(min=1)
    metrics = {
        "is/ratio_mean": float(ratio[mask].mean()) if mask.any() else 1.0,
        "is/weight_mean": float(weights[mask].mean()) if mask.any() else 1.0,
        ("is/masked_frac" if mode.endswith("mask") else "is/truncated_frac"): float((outside & mask).sum() / count),
    }
    return weights, metrics
