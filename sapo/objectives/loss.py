"""policy_loss: the one entry point of the objectives layer.

    loss = sum_{i,t} weight_{i,t} * tw_{i,t} * l_{i,t}  +  beta * sum_{i,t} weight_{i,t} * KL_{i,t}
with l the shaped per-token loss (shaping.py) of the chosen ratio (ratios.py), weight the aggregation
weights (aggregation.py) and tw optional detached token_weights. A sequence-ratio objective (GSPO) has one
loss per sequence instead, averaged over sequences without length weighting.

What is built for the shaping follows the objective's declarations (`spec.consumes`, registry.py), never
its name: log-probs with gradient only when consumed, a detached ratio when declared.

Masked positions are made finite and zeroed before any arithmetic (masking.py), so NaN/inf there never
reach the loss or the gradients; a NaN at an unmasked position (log-probs, advantages, reference
log-probs, token weights) makes the loss NaN.
"""

from __future__ import annotations

import torch

from sapo.objectives.aggregation import Count, aggregation_weights, sequence_weights
from sapo.objectives.kl import token_kl
from sapo.objectives.masking import float_mask, masked_finite, nan_if
from sapo.objectives.metrics import policy_metrics
from sapo.objectives.presets import LossSpec, resolve
from sapo.objectives.ratios import (
    masked_token_log_ratio,
    sequence_log_ratio,
    sequence_token_ratio,
    token_log_ratio,
)
from sapo.objectives.registry import get_shaping


def _token_advantages(advantages: torch.Tensor) -> torch.Tensor:
    """Float32 advantages that broadcast over tokens: [B] per sequence becomes [B, 1]."""
    advantages = advantages.detach().float()
    return advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages


def token_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, spec: LossSpec
) -> torch.Tensor:
    """Per-token un-aggregated loss of a token-ratio objective, float32, same shape as `logprobs`.

    sapo: -f(r) A; clip: -min(r A, clip(r) A); cispo: -sg[min(r, cap)] A logp; none: -r A.
    `advantages` is the token shape (already broadcast) or [B] for [B, T] inputs. Differentiable in `logprobs`.
    There is no mask here: pass finite values (policy_loss sanitises masked positions first).
    The policy loss is (token_loss * aggregation_weights(mask, spec)).sum().
    """
    if not spec.token_level:
        raise ValueError(
            f"token_loss covers ratio_level='token' objectives; {spec.loss_type!r} uses "
            f"ratio_level={spec.ratio_level!r}, which needs the mask: use policy_loss"
        )
    advantages = _token_advantages(advantages)
    ratio_logprobs = logprobs.detach() if spec.detached_ratio else logprobs
    ratio = torch.exp(token_log_ratio(ratio_logprobs, old_logprobs, spec.log_ratio_clamp))
    shaping = get_shaping(spec.shaping)
    logp = logprobs.float() if "logprobs" in shaping.consumes else None
    return shaping.fn(ratio, advantages, logp, spec)


def _check_shapes(logprobs, old_logprobs, advantages, mask, ref_logprobs, token_weights) -> None:
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {tuple(logprobs.shape)}")
    for name, tensor in (("old_logprobs", old_logprobs), ("mask", mask), ("ref_logprobs", ref_logprobs),
                         ("token_weights", token_weights)):
        if tensor is not None and tensor.shape != logprobs.shape:
            raise ValueError(f"{name} must have the shape of logprobs {tuple(logprobs.shape)}, got {tuple(tensor.shape)}")
    if advantages.shape not in (logprobs.shape[:1], logprobs.shape):
        raise ValueError(
            f"advantages must be [B] (per sequence) or [B, T] (per token) with B, T = {tuple(logprobs.shape)}, "
            f"got {tuple(advantages.shape)}"
        )


def policy_loss(
    logprobs: torch.Tensor,  # [B, T] current policy, gradient flows
    old_logprobs: torch.Tensor,  # [B, T] behaviour policy
    advantages: torch.Tensor,  # [B] or [B, T]
    mask: torch.Tensor,  # [B, T] bool or float, 1 for completion tokens
    loss_type: str = "sapo",
    *,
    ref_logprobs: torch.Tensor | None = None,  # [B, T], needed when beta > 0
    token_weights: torch.Tensor | None = None,  # [B, T] detached per-token multipliers (e.g. truncated IS)
    num_sequences: Count = None,  # global rows B the loss averages over (default: this batch)
    num_tokens: Count = None,  # global unmasked tokens for token_mean (default: this batch)
    with_metrics: bool = True,  # False skips the diagnostics and returns {}
    **options,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Scalar float32 loss (to minimise) and a dict of float metrics. See docs/objectives.md."""
    spec = resolve(loss_type, **options)
    _check_shapes(logprobs, old_logprobs, advantages, mask, ref_logprobs, token_weights)
    if spec.needs_ref_logprobs and ref_logprobs is None:
        raise ValueError(f"beta={spec.beta} > 0 needs ref_logprobs ([B, T] reference-model log-probs)")
    if spec.sequence_advantages and advantages.dim() != 1:
        raise ValueError(
            "ratio_level='sequence' (gspo) needs per-sequence advantages of shape [B]; for per-token "
            "advantages use loss_type='gspo_token' (ratio_level='sequence_token')"
        )
    if token_weights is not None and spec.ratio_level == "sequence":
        raise ValueError("token_weights multiply per-token losses: use ratio_level 'token' or 'sequence_token'")

    maskf = float_mask(mask)  # [B, T] 0/1
    # Masked slots are made finite and zeroed before any arithmetic (masking.py): NaN * 0 would be NaN.
    # A detached-ratio shaping (CISPO) gets a ratio without graph: its gradient flows through logp only.
    ratio_logprobs = logprobs.detach() if spec.detached_ratio else logprobs
    log_ratio, bad = masked_token_log_ratio(ratio_logprobs, old_logprobs, maskf, spec.log_ratio_clamp)  # 0 where masked
    lengths = maskf.sum(-1)  # [B]
    if advantages.dim() == 1:  # per sequence: [B, 1], rows without tokens get 0
        token_adv = torch.where(lengths > 0, advantages.detach().float(), 0.0).unsqueeze(-1)
    else:
        token_adv, bad_adv = masked_finite(advantages.detach(), maskf)  # [B, T]
        bad = bad | bad_adv
    # [B, T] when the shaping, the sequence_token ratio or the KL term consumes it; an unmasked NaN here is
    # also one in the log-ratio, already flagged in `bad`
    logp = masked_finite(logprobs, maskf, flag_nan=False)[0] if spec.needs_logprobs else None
    shaping = get_shaping(spec.shaping)

    if spec.ratio_level == "sequence":
        seq_log_ratio = sequence_log_ratio(log_ratio, maskf)  # [B]
        seq_ratio = torch.exp(seq_log_ratio)  # s_i, GSPO eq. 7
        seq_loss = shaping.fn(seq_ratio, token_adv.squeeze(-1), None, spec)  # [B] (no per-token logprobs here)
        policy = (seq_loss * sequence_weights(maskf, num_sequences=num_sequences)).sum()
        ratio = seq_ratio.unsqueeze(-1).expand(maskf.shape)  # [B, T] view, for the metrics
        weights = None
    else:
        if spec.ratio_level == "token":
            ratio = torch.exp(log_ratio)  # r_{i,t}
        else:  # sequence_token, GSPO eq. 13
            ratio = sequence_token_ratio(logp, sequence_log_ratio(log_ratio, maskf))
        shaping_logp = logp if "logprobs" in shaping.consumes else None  # only to a shaping that declares it
        per_token = shaping.fn(ratio, token_adv, shaping_logp, spec)  # [B, T]
        if token_weights is not None:
            token_weights, bad_weights = masked_finite(token_weights.detach(), maskf)
            per_token = per_token * token_weights
            bad = bad | bad_weights
        weights = aggregation_weights(maskf, spec, num_sequences=num_sequences, num_tokens=num_tokens)
        policy = (per_token * weights).sum()

    loss = policy
    kl_term = per_token_kl = None
    if spec.needs_ref_logprobs:
        ref_logp, bad_ref = masked_finite(ref_logprobs.detach(), maskf)  # [B, T]
        bad = bad | bad_ref
        per_token_kl = token_kl(logp, ref_logp, spec.kl_estimator, spec.log_ratio_clamp)  # 0 where masked
        if weights is None:  # sequence ratio: KL as a token mean per sequence, mean over sequences
            weights = aggregation_weights(maskf, spec, num_sequences=num_sequences)
        kl_term = spec.beta * (per_token_kl * weights).sum()
        loss = policy + kl_term
    # A NaN log-prob at a real (unmasked) token must not be silently zeroed: it makes the loss NaN.
    loss = loss + nan_if(bad)

    if not with_metrics:
        return loss, {}
    metrics = policy_metrics(spec, maskf, log_ratio, ratio, token_adv, policy, loss, kl_term, per_token_kl)
    return loss, metrics
