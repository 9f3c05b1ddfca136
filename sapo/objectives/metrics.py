"""Diagnostics of one policy_loss call: plain Python floats under stable names, one device sync.

Statistics are over unmasked tokens (or non-empty sequences), computed without gradient; a statistic
over an empty set is nan. `metric_names(loss_type, **options)` lists the keys policy_loss returns.
"""

from __future__ import annotations

import numpy as np
import torch

from sapo.objectives.presets import LossSpec, resolve
from sapo.objectives.shaping import cispo_cap, soft_gate_weight, temperatures

QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)
SIGN_QUANTILES = (0.10, 0.50, 0.90)


def _quantile_names(prefix: str, qs, suffix: str = "") -> list[str]:
    return [f"{prefix}q{round(q * 100):02d}{suffix}" for q in qs]


def metric_names(loss_type: str | LossSpec = "sapo", **options) -> list[str]:
    """The keys of the metrics dict policy_loss returns for this objective, in order."""
    spec = loss_type if isinstance(loss_type, LossSpec) else resolve(loss_type, **options)
    names = ["ratio/mean", "ratio/std", "ratio/min", "ratio/max"]
    names += _quantile_names("log_ratio/", QUANTILES) + ["log_ratio/seq_var_mean"]
    names += ["loss/policy", "loss/total"]
    if spec.beta > 0:
        names += ["loss/kl", "kl/mean"]
    if spec.ratio_level != "token":
        names += ["seq_ratio/mean", "seq_ratio/min", "seq_ratio/max"]
    if spec.shaping == "clip":
        level = "seq_" if spec.ratio_level == "sequence" else ""
        names += [f"clip/{level}low_frac", f"clip/{level}high_frac", f"clip/{level}frac"]
    if spec.shaping == "cispo":
        names += ["cispo/capped_frac"]
    if spec.shaping == "soft_gate":
        names += ["sapo/gate_mean", "sapo/gate_lt_0.5_frac"]
        names += ["sapo/gate_mean_pos", "sapo/gate_mean_neg", "sapo/gate_lt_0.5_frac_pos", "sapo/gate_lt_0.5_frac_neg"]
        names += _quantile_names("sapo/log_ratio_", SIGN_QUANTILES, "_pos")
        names += _quantile_names("sapo/log_ratio_", SIGN_QUANTILES, "_neg")
        names += ["sapo/seq_gate_gap", "sapo/seq_gate_gap_bound"]
    return names


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask` (bool, same shape); nan when the mask is empty."""
    return torch.where(mask, values, 0.0).sum() / mask.sum()


def masked_extreme(values: torch.Tensor, mask: torch.Tensor, largest: bool) -> torch.Tensor:
    """max (largest) or min of values[mask]; nan when the mask is empty (also for zero-size inputs)."""
    fill = -torch.inf if largest else torch.inf
    flat = torch.cat([torch.where(mask, values, fill).flatten(), values.new_full((1,), fill)])
    extreme = flat.max() if largest else flat.min()
    return torch.where(mask.any(), extreme, torch.nan)


def masked_quantiles(values: torch.Tensor, mask: torch.Tensor, qs) -> torch.Tensor:
    """Linear-interpolation quantiles (torch.quantile's default) of values[mask], [Q]; nan when empty.

    On CPU, numpy's partition-based quantile (O(n); a full CPU sort of 256k values costs ~40 ms);
    elsewhere a device sort without host sync.
    """
    if values.device.type == "cpu":
        selected = values[mask]
        if selected.numel() == 0:
            return torch.full((len(qs),), torch.nan)
        return torch.from_numpy(np.quantile(selected.numpy(), qs)).float()
    return sorted_quantiles(values, mask, qs)


def sorted_quantiles(values: torch.Tensor, mask: torch.Tensor, qs) -> torch.Tensor:
    """masked_quantiles by sorting on the tensor's device, no sync: masked entries sort to the end."""
    # One extra +inf keeps the sorted vector non-empty.
    flat = torch.cat([torch.where(mask, values, torch.inf).flatten(), values.new_full((1,), torch.inf)])
    ordered = torch.sort(flat).values
    count = mask.sum()
    position = torch.tensor(qs, dtype=torch.float32, device=values.device) * (count - 1).clamp(min=0)  # [Q]
    low = position.floor().long()
    high = position.ceil().long()
    frac = position - low
    result = ordered[low] * (1 - frac) + ordered[high] * frac
    return torch.where(count > 0, result, torch.nan)


def _fraction(event: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return masked_mean(event.float(), mask)


@torch.no_grad()
def policy_metrics(
    spec: LossSpec,
    mask: torch.Tensor,  # [B, T] bool
    log_ratio: torch.Tensor,  # [B, T] token log-ratios z, 0 at masked positions
    ratio: torch.Tensor,  # [B, T] the ratio the objective shapes (r, s_i broadcast, or s_{i,t})
    advantages: torch.Tensor,  # [B, T] float32, 0 at masked positions
    policy: torch.Tensor,  # scalar policy loss
    total: torch.Tensor,  # scalar total loss
    kl_term: torch.Tensor | None = None,  # scalar beta * aggregated KL
    token_kl: torch.Tensor | None = None,  # [B, T] per-token KL estimate
) -> dict[str, float]:
    log_ratio, ratio, advantages = log_ratio.detach(), ratio.detach(), advantages.detach()
    values: list[torch.Tensor] = []
    lengths = mask.sum(-1)  # [B]
    nonempty = lengths > 0  # [B]
    token_ratio = torch.exp(log_ratio)  # [B, T]

    mean = masked_mean(token_ratio, mask)
    variance = masked_mean((token_ratio - mean) ** 2, mask)
    values += [mean, variance.sqrt()]
    values += [masked_extreme(token_ratio, mask, largest=False), masked_extreme(token_ratio, mask, largest=True)]
    values += list(masked_quantiles(log_ratio, mask, QUANTILES).unbind())

    # Var_i: in-sequence (population) variance of the token log-ratios, SAPO section 4.1.
    seq_log_ratio = log_ratio.sum(-1) / lengths.clamp(min=1)  # [B]
    centred = torch.where(mask, log_ratio - seq_log_ratio.unsqueeze(-1), 0.0)  # [B, T]
    seq_var = centred.pow(2).sum(-1) / lengths.clamp(min=1)  # [B]
    values += [masked_mean(seq_var, nonempty)]

    values += [policy.detach(), total.detach()]
    if spec.beta > 0:
        values += [kl_term.detach(), masked_mean(token_kl.detach(), mask)]
    if spec.ratio_level != "token":
        seq_ratio = torch.exp(seq_log_ratio)  # [B]
        values += [masked_mean(seq_ratio, nonempty)]
        values += [masked_extreme(seq_ratio, nonempty, largest=False), masked_extreme(seq_ratio, nonempty, largest=True)]

    positive, negative = mask & (advantages > 0), mask & (advantages < 0)
    if spec.shaping == "clip":
        # A clipped token (or sequence) is one whose gradient the clip removes.
        low = (ratio < 1 - spec.epsilon_low) & (advantages < 0)
        high = (ratio > 1 + spec.epsilon_high) & (advantages > 0)
        if spec.ratio_level == "sequence":  # one decision per sequence: count sequences
            low, high, where = (low & mask).any(-1), (high & mask).any(-1), nonempty
        else:
            where = mask
        values += [_fraction(low, where), _fraction(high, where), _fraction(low | high, where)]
    if spec.shaping == "cispo":
        values += [_fraction(ratio > cispo_cap(spec), mask)]
    if spec.shaping == "soft_gate":
        tau = temperatures(advantages, spec.tau_pos, spec.tau_neg)  # [B, T]
        gate = soft_gate_weight(ratio, tau)  # [B, T], w = sech^2(tau (r - 1) / 2)
        small = gate < 0.5
        values += [masked_mean(gate, mask), _fraction(small, mask)]
        values += [masked_mean(gate, positive), masked_mean(gate, negative)]
        values += [_fraction(small, positive), _fraction(small, negative)]
        values += list(masked_quantiles(log_ratio, positive, SIGN_QUANTILES).unbind())
        values += list(masked_quantiles(log_ratio, negative, SIGN_QUANTILES).unbind())
        # Coherence (section 4.1): |mean_t g(z_t) - g(log s_i)| <= (tau^2 / 4) Var_i, g(z) = sech^2(tau z / 2).
        token_gate = soft_gate_weight(1.0 + log_ratio, tau)  # [B, T]
        seq_gate = soft_gate_weight(1.0 + seq_log_ratio.unsqueeze(-1), tau)  # [B, T]
        gap = torch.where(mask, token_gate - seq_gate, 0.0).sum(-1).abs() / lengths.clamp(min=1)  # [B]
        tau_sq = torch.where(mask, tau * tau, 0.0).sum(-1) / lengths.clamp(min=1)  # [B]
        values += [masked_mean(gap, nonempty), masked_mean(tau_sq / 4 * seq_var, nonempty)]

    names = metric_names(spec)
    numbers = torch.stack([value.float() for value in values]).tolist()  # the one sync
    return dict(zip(names, numbers, strict=True))
