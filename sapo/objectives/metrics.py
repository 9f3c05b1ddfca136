"""Diagnostics of one policy_loss call: plain Python floats under stable names, one device sync.

Statistics are over unmasked tokens (or non-empty sequences), computed without gradient; a statistic
over an empty set is nan. `metric_names(loss_type, **options)` lists the keys policy_loss returns.
"""

from __future__ import annotations

import numpy as np
import torch

from sapo.objectives.presets import LossSpec, resolve
from sapo.objectives.shaping import cispo_cap, soft_gate_weight

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


def quantiles(values: torch.Tensor, qs) -> torch.Tensor:
    """[Q] float32 quantiles of a 1-D tensor (linear interpolation, like torch.quantile); nan when empty.

    On CPU numpy's partition-based quantile (O(n); a CPU sort of 256k floats costs ~40 ms), elsewhere
    a device sort.
    """
    if values.numel() == 0:
        return torch.full((len(qs),), torch.nan, device=values.device)
    if values.device.type == "cpu":
        return numpy_quantiles(values, qs)
    return torch_quantiles(values, qs)


def numpy_quantiles(values: torch.Tensor, qs) -> torch.Tensor:
    return torch.from_numpy(np.quantile(values.numpy(), qs)).float()


def torch_quantiles(values: torch.Tensor, qs) -> torch.Tensor:
    """By a sort on the tensor's device (torch.quantile refuses inputs above 2^24 elements)."""
    ordered = torch.sort(values.float()).values  # [N]
    position = torch.tensor(qs, dtype=torch.float32, device=values.device) * (values.numel() - 1)  # [Q]
    low, high = position.floor().long(), position.ceil().long()
    frac = position - low
    return ordered[low] * (1 - frac) + ordered[high] * frac


def _mean(values: torch.Tensor) -> torch.Tensor:
    return values.mean() if values.numel() else values.new_tensor(torch.nan)


def _extremes(values: torch.Tensor) -> list[torch.Tensor]:
    if values.numel() == 0:
        return [values.new_tensor(torch.nan)] * 2
    return [values.min(), values.max()]


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum(values * weights) / sum(weights) for finite values and 0/1 float weights; nan when all weights are 0."""
    return (values * weights).sum() / weights.sum()


@torch.no_grad()
def policy_metrics(
    spec: LossSpec,
    mask: torch.Tensor,  # [B, T] float 0/1
    log_ratio: torch.Tensor,  # [B, T] token log-ratios z: finite, 0 at masked positions
    ratio: torch.Tensor,  # [B, T] the ratio the objective shapes (r, s_i broadcast, or s_{i,t}); finite
    advantages: torch.Tensor,  # [B, 1] or [B, T] float32, 0 at masked positions
    policy: torch.Tensor,  # scalar policy loss
    total: torch.Tensor,  # scalar total loss
    kl_term: torch.Tensor | None = None,  # scalar beta * aggregated KL
    token_kl: torch.Tensor | None = None,  # [B, T] per-token KL estimate, 0 at masked positions
) -> dict[str, float]:
    """The metrics dict. Token statistics work on the unmasked tokens gathered into 1-D vectors (on a
    GPU that gather is one host sync), sequence statistics on masked [B, T] sums; one .tolist() at the end."""
    B, T = mask.shape
    log_ratio, ratio, advantages = log_ratio.detach(), ratio.detach(), advantages.detach()
    lengths = mask.sum(-1)  # [B]
    nonempty = (lengths > 0).float()  # [B]
    safe_lengths = lengths.clamp(min=1)  # [B]
    index = mask.flatten().nonzero().squeeze(-1)  # [N] flat indices of the real tokens
    rows = index // T  # [N] sequence of each token
    z = log_ratio.flatten()[index]  # [N]
    token_ratio = torch.exp(z)  # [N]
    token_adv = advantages[:, 0][rows] if advantages.shape[-1] == 1 else advantages.flatten()[index]  # [N]
    values: list[torch.Tensor] = []

    values += [_mean(token_ratio), token_ratio.std(unbiased=False) if index.numel() else token_ratio.new_tensor(torch.nan)]
    values += _extremes(token_ratio)
    values += list(quantiles(z, QUANTILES).unbind())

    # Var_i: in-sequence (population) variance of the token log-ratios, SAPO section 4.1.
    seq_log_ratio = log_ratio.sum(-1) / safe_lengths  # [B]
    seq_var = ((log_ratio - seq_log_ratio.unsqueeze(-1)).pow(2) * mask).sum(-1) / safe_lengths  # [B]
    values += [_weighted_mean(seq_var, nonempty)]

    values += [policy.detach(), total.detach()]
    if spec.beta > 0:
        values += [kl_term.detach(), _weighted_mean(token_kl.detach(), mask)]
    if spec.ratio_level != "token":
        seq_ratio = torch.exp(seq_log_ratio)[lengths > 0]  # [B'] non-empty sequences
        values += [_mean(seq_ratio), *_extremes(seq_ratio)]

    objective_ratio = ratio.flatten()[index] if spec.ratio_level != "sequence" else ratio[:, 0][rows]  # [N]
    positive, negative = token_adv > 0, token_adv < 0  # [N]
    if spec.shaping == "clip":
        # A clipped token (or sequence) is one whose gradient the clip removes.
        if spec.ratio_level == "sequence":  # one decision per sequence: count sequences
            seq_ratio_all, seq_adv = ratio[:, 0], advantages[:, 0]  # [B]
            low = ((seq_ratio_all < 1 - spec.epsilon_low) & (seq_adv < 0)).float()
            high = ((seq_ratio_all > 1 + spec.epsilon_high) & (seq_adv > 0)).float()
            values += [_weighted_mean(low, nonempty), _weighted_mean(high, nonempty),
                       _weighted_mean(low + high, nonempty)]
        else:
            low = ((objective_ratio < 1 - spec.epsilon_low) & negative).float()
            high = ((objective_ratio > 1 + spec.epsilon_high) & positive).float()
            values += [_mean(low), _mean(high), _mean(low + high)]
    if spec.shaping == "cispo":
        values += [_mean((objective_ratio > cispo_cap(spec)).float())]
    if spec.shaping == "soft_gate":
        positive_f, negative_f = positive.float(), negative.float()
        tau = spec.tau_neg + (spec.tau_pos - spec.tau_neg) * positive_f  # [N], tau_pos where A > 0 (shaping.py)
        gate = soft_gate_weight(objective_ratio, tau)  # [N], w = sech^2(tau (r - 1) / 2)
        small = (gate < 0.5).float()
        values += [_mean(gate), _mean(small)]
        values += [_weighted_mean(gate, positive_f), _weighted_mean(gate, negative_f)]
        values += [_weighted_mean(small, positive_f), _weighted_mean(small, negative_f)]
        values += list(quantiles(z[positive], SIGN_QUANTILES).unbind())
        values += list(quantiles(z[negative], SIGN_QUANTILES).unbind())
        # Coherence (section 4.1): |mean_t g(z_t) - g(log s_i)| <= (tau^2 / 4) Var_i, g(z) = sech^2(tau z / 2).
        gap_tokens = soft_gate_weight(1.0 + z, tau) - soft_gate_weight(1.0 + seq_log_ratio[rows], tau)  # [N]
        gap = z.new_zeros(B).index_add_(0, rows, gap_tokens).abs() / safe_lengths  # [B]
        tau_sq = z.new_zeros(B).index_add_(0, rows, tau * tau) / safe_lengths  # [B], mean tau^2 per sequence
        values += [_weighted_mean(gap, nonempty), _weighted_mean(tau_sq / 4 * seq_var, nonempty)]

    names = metric_names(spec)
    numbers = torch.stack([value.float().reshape(()) for value in values]).tolist()  # the one sync
    return dict(zip(names, numbers, strict=True))
