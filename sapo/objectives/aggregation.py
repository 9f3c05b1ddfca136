"""How per-token losses become one scalar: the `aggregation` axis of a LossSpec.

Every aggregation is a weighted sum, loss = sum_{i,t} weight_{i,t} * loss_{i,t}, with weight 0 at
masked positions. Writing it this way makes gradient accumulation and data parallelism explicit: pass
the GLOBAL normaliser (over all micro-batches and ranks of one optimizer step) and the partial losses
add up to the loss of the whole batch.

  seq_mean_token_mean     (1/B) sum_i (1/|y_i|) sum_t l_{i,t}   normaliser: num_sequences B (global rows)
  token_mean              (1/N) sum_{i,t} l_{i,t}               normaliser: num_tokens N (global unmasked tokens)
  seq_mean_token_sum_norm (1/(B L_max)) sum_{i,t} l_{i,t}       normaliser: num_sequences B; L_max is
                                                                max_completion_length (a constant, Dr.GRPO)
  seq_mean                (1/B) sum_i l_i                       normaliser: num_sequences B (sequence ratio)
B counts every row, including rows with no unmasked token; |y_i| is clamped to >= 1, N to >= 1,
so an empty sequence (or batch) contributes nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sapo.objectives.axes import AGGREGATIONS
from sapo.objectives.masking import float_mask

if TYPE_CHECKING:
    from sapo.objectives.presets import LossSpec

Count = int | float | torch.Tensor | None


def _count(value: Count, default: torch.Tensor | int, name: str) -> torch.Tensor | float:
    """A normaliser as a float or a float32 tensor (a tensor stays on device: no sync)."""
    if value is None:
        value = default
    if isinstance(value, torch.Tensor):
        return value.float().clamp(min=1.0)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return float(max(value, 1))


def sequence_weights(mask: torch.Tensor, *, num_sequences: Count = None) -> torch.Tensor:
    """[B] float32 weights of a per-sequence loss for `seq_mean`: 1/B for rows with tokens, 0 for empty rows."""
    rows = _count(num_sequences, mask.shape[0], "num_sequences")
    return (float_mask(mask).sum(-1) > 0).float() / rows  # [B]


def aggregation_weights(
    mask: torch.Tensor, spec: LossSpec, *, num_sequences: Count = None, num_tokens: Count = None
) -> torch.Tensor:
    """[B, T] float32 weights such that the policy loss of a token-level objective is
    (token_loss * weights).sum(), exactly, with zeros at masked positions.

    num_sequences: global row count the loss is averaged over (default: this batch's rows).
    num_tokens: global unmasked-token count for `token_mean` (default: this batch's count).
    For `seq_mean` (sequence ratio) the weights are those of `seq_mean_token_mean`: applied to a per-sequence
    loss broadcast over its tokens they give the plain sequence mean, not a length-weighted one.
    """
    maskf = float_mask(mask)  # [B, T] 0/1
    aggregation = spec.aggregation
    if aggregation in ("seq_mean_token_mean", "seq_mean"):
        rows = _count(num_sequences, mask.shape[0], "num_sequences")
        lengths = maskf.sum(-1, keepdim=True).clamp(min=1.0)  # [B, 1]
        return maskf * (1.0 / (lengths * rows))  # [B, T]
    if aggregation == "token_mean":
        tokens = _count(num_tokens, maskf.sum(), "num_tokens")
        return maskf * (1.0 / tokens)
    if aggregation == "seq_mean_token_sum_norm":
        if spec.max_completion_length is None:
            raise ValueError("aggregation='seq_mean_token_sum_norm' (dr_grpo) needs max_completion_length")
        rows = _count(num_sequences, mask.shape[0], "num_sequences")
        return maskf * (1.0 / (rows * float(spec.max_completion_length)))
    raise ValueError(f"unknown aggregation {aggregation!r}; allowed: {', '.join(AGGREGATIONS)}")
