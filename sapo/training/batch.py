"""A rollout batch as tensors, and the per-step arithmetic on it (advantages, row selection)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from sapo.rollout import RolloutBatch


def group_advantages(rewards: torch.Tensor, scale: str, eps: float = 1e-4) -> torch.Tensor:
    """rewards [P, G] -> advantages [P, G]: A_i = (R_i - mean_group) / (std + eps).

    std is the sample standard deviation (torch.std's default, as TRL), per group or over the
    whole batch; scale="none" keeps only the mean baseline (Dr.GRPO).
    """
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if scale == "none":
        return centered
    if scale == "batch":
        std = rewards.std() if rewards.numel() > 1 else rewards.new_tensor(0.0)
    else:
        std = rewards.std(dim=1, keepdim=True)
    return centered / (std + eps)


@dataclass
class RolloutTensors:
    """A rollout batch, padded: prompts left-padded to P, completions right-padded to C."""

    input_ids: torch.Tensor  # [N, P + C]
    attention_mask: torch.Tensor  # [N, P + C]
    position_ids: torch.Tensor  # [N, P + C], counting from each row's first real token
    completion_mask: torch.Tensor  # [N, C] bool, tokens that enter the loss
    prompt_width: int
    sampler_logprobs: torch.Tensor  # [N, C] float32, 0 where masked
    advantages: torch.Tensor  # [N] float32
    extra: list[dict] = field(default_factory=list)  # per-row multimodal inputs (VL)

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]


def pack_rollout(batch: RolloutBatch, advantages, pad_id: int, mask_truncated: bool) -> RolloutTensors:
    """Pad a rollout (RolloutBatch.to_padded) and keep the completion columns' masks [N, C]."""
    padded = batch.to_padded(pad_id)
    P = max(len(p) for p in batch.prompt_ids)
    completion_mask = padded["completion_mask"][:, P:].bool()  # [N, C]
    if mask_truncated:
        completion_mask &= ~torch.tensor(batch.truncated, dtype=torch.bool)[:, None]
    input_ids, attention = padded["input_ids"], padded["attention_mask"]
    if completion_mask.shape[1] == 0:  # every completion empty: keep one (masked) column
        input_ids = torch.nn.functional.pad(input_ids, (0, 1), value=pad_id)
        attention = torch.nn.functional.pad(attention, (0, 1))
        completion_mask = torch.zeros((len(batch), 1), dtype=torch.bool)
    position_ids = (attention.cumsum(dim=1) - 1).clamp(min=0)  # [N, P + C]
    sampler = torch.zeros(completion_mask.shape, dtype=torch.float32)
    sampler[:, : padded["sampler_logprobs"].shape[1] - P] = padded["sampler_logprobs"][:, P:]
    return RolloutTensors(input_ids, attention, position_ids, completion_mask, P, sampler,
                          torch.as_tensor(advantages, dtype=torch.float32))


def select_rows(t: RolloutTensors, idx: torch.Tensor) -> RolloutTensors:
    return RolloutTensors(
        t.input_ids[idx], t.attention_mask[idx], t.position_ids[idx], t.completion_mask[idx], t.prompt_width,
        t.sampler_logprobs[idx], t.advantages[idx], [t.extra[i] for i in idx.tolist()] if t.extra else [],
    )


def merge_metrics(rows: list[dict[str, float]], *, sum_prefixes: tuple[str, ...] = ()) -> dict[str, float]:
    """One row from several (micro-batches, updates or ranks): */min and */max exactly, keys under
    sum_prefixes summed, everything else averaged; non-finite and non-numeric values are left out."""
    out: dict[str, float] = {}
    for key in sorted({k for r in rows for k in r}):
        vals = [r[key] for r in rows
                if isinstance(r.get(key), int | float) and not isinstance(r[key], bool) and math.isfinite(r[key])]
        if not vals:
            continue
        if key.endswith("/min"):
            out[key] = min(vals)
        elif key.endswith("/max"):
            out[key] = max(vals)
        elif sum_prefixes and key.startswith(sum_prefixes):
            out[key] = sum(vals)
        else:
            out[key] = sum(vals) / len(vals)
    return out
