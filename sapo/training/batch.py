"""A rollout batch as tensors, and the per-step arithmetic on it (advantages, row selection)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sapo.rollout import RolloutBatch
from sapo.tracking import merge_metrics  # noqa: F401  (re-exported: the loop's pieces merge metric rows)


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


def completion_positions(t: RolloutTensors) -> torch.Tensor:
    """[b, P + C] bool: the positions of completion tokens that enter the loss (where MoE routing matters)."""
    full = torch.zeros(t.input_ids.shape, dtype=torch.bool)
    full[:, t.prompt_width :] = t.completion_mask
    return full


def trim_padding(t: RolloutTensors) -> tuple[RolloutTensors, int]:
    """Drop the columns that are padding in every row of t: prompt columns on the left (prompts are
    left-padded) and completion columns on the right. Returns the trimmed rows and `left`, the number
    of prompt columns dropped: column j of the trimmed rows is column j + left of t, and completion
    column c stays completion column c (only its width shrinks). Positions count from each row's
    first real token, so the model sees the same sequences."""
    real = t.attention_mask.bool()  # [b, P + C]
    P = t.prompt_width
    prompt_cols = real[:, :P].any(dim=0).nonzero()
    left = int(prompt_cols[0]) if len(prompt_cols) else max(P - 1, 0)  # keep one column: hidden[P - 1] predicts
    completion_cols = real[:, P:].any(dim=0).nonzero()
    width = max(int(completion_cols[-1]) + 1 if len(completion_cols) else 0, 1)  # >= 1 column, as pack_rollout
    end = P + width
    if left == 0 and end == t.input_ids.shape[1]:
        return t, 0
    return RolloutTensors(
        t.input_ids[:, left:end], t.attention_mask[:, left:end], t.position_ids[:, left:end],
        t.completion_mask[:, :width], P - left, t.sampler_logprobs[:, :width], t.advantages, t.extra,
    ), left


def micro_batch_plan(t: RolloutTensors, rows: torch.Tensor, *, max_rows: int = 0, max_tokens: int = 0) -> list[torch.Tensor]:
    """Split `rows` into micro-batches of at most max_rows rows and at most max_tokens padded tokens
    (rows x (longest prompt + longest completion) after trim_padding); 0 means no limit.

    With a token budget the rows are taken longest first, so rows of similar length share a
    micro-batch and little padding is computed; a row longer than the budget goes alone. Which rows
    share a micro-batch does not change the accumulated gradient: the loss normalisers are the
    mini-batch's."""
    if not max_tokens:
        return list(torch.split(rows, max_rows or len(rows)))
    real = t.attention_mask[rows].bool()  # [n, P + C]
    prompt_len = real[:, : t.prompt_width].sum(dim=1)  # [n], left-padded
    cols = torch.arange(real.shape[1] - t.prompt_width)
    completion_len = torch.where(real[:, t.prompt_width :], cols + 1, 0).amax(dim=1)  # [n] extent, right-padded
    order = torch.argsort(prompt_len + completion_len, descending=True, stable=True)
    plan, current, longest_prompt, longest_completion = [], [], 0, 0
    for i in order.tolist():
        p, c = max(longest_prompt, int(prompt_len[i])), max(longest_completion, int(completion_len[i]))
        if current and ((len(current) + 1) * (p + c) > max_tokens or len(current) == (max_rows or len(rows))):
            plan.append(rows[torch.tensor(current)])
            current, p, c = [], int(prompt_len[i]), int(completion_len[i])
        current.append(i)
        longest_prompt, longest_completion = p, c
    plan.append(rows[torch.tensor(current)])
    return plan


def split_plan(plan: list[torch.Tensor], count: int) -> list[torch.Tensor]:
    """Split the largest micro-batches in two until the plan has `count` of them (data-parallel
    ranks must run the same number of forwards; FSDP gathers the weights in each)."""
    plan = list(plan)
    while len(plan) < count:
        largest = max(range(len(plan)), key=lambda i: len(plan[i]))
        if len(plan[largest]) < 2:
            raise ValueError(
                f"cannot make {count} micro-batches from {sum(len(m) for m in plan)} rows on this rank: another "
                "data-parallel rank needs that many for its token budget; raise micro_batch_tokens"
            )
        half = len(plan[largest]) // 2
        plan[largest : largest + 1] = [plan[largest][:half], plan[largest][half:]]
    return plan
