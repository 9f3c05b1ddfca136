"""The trainer's forward over rollout rows: log-probs (and entropy) of the completion tokens.

Log-probs never go through the full [N, V] logits: the backbone gives hidden states, and
`sapo.ops.token_logprobs` turns the completion positions' hidden states into log-probs chunk by
chunk (divided by the sampling temperature, as the sampler did). Rows run in micro-batches, each
cut to its own longest prompt and completion.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from sapo import distributed
from sapo.config import ConfigError, TrainConfig
from sapo.models.forward import hidden_states, output_bias, output_weight
from sapo.ops import token_logprobs
from sapo.training.batch import RolloutTensors, micro_batch_plan, select_rows, split_plan, trim_padding


@dataclass(frozen=True)
class ForwardSettings:
    """What the trainer's forward needs from the config."""

    temperature: float = 1.0  # the sampling temperature: log-probs of logits / temperature
    autocast_bf16: str = "auto"  # "auto" (on for CUDA with bf16), "on", "off"
    chunk_size: int = 0  # rows per log-prob head chunk (0 = automatic)
    micro_batch_size: int = 0  # rows per forward/backward (0 = all)
    micro_batch_tokens: int = 0  # padded tokens per forward/backward (0 = no budget)

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> ForwardSettings:
        return cls(cfg.temperature, cfg.autocast_bf16, cfg.logprob_chunk_size, cfg.micro_batch_size,
                   cfg.micro_batch_tokens)


class TeacherForcing:
    """Teacher-forced log-probs of rollout rows through a model (the policy, pi_old, or a reference)."""

    def __init__(self, settings: ForwardSettings, *, pad_token_id: int, device: torch.device):
        self.settings = settings
        self.pad_token_id = pad_token_id
        self.device = torch.device(device)

    def autocast(self):
        mode = self.settings.autocast_bf16
        on = mode == "on" or (mode == "auto" and self.device.type == "cuda" and torch.cuda.is_bf16_supported())
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16) if on else contextlib.nullcontext()

    def hidden(self, model, t: RolloutTensors):
        """Hidden states [n, d] that predict the n completion tokens of rows t, their labels [n], mask [b, C]."""
        input_ids = t.input_ids.to(self.device)
        extra = _stack_extra(t.extra, t.prompt_width, input_ids.shape[1], self.device)
        # with images (Qwen3-VL) the model computes its 3-D mrope positions from the ids, mask and grids
        position_ids = None if extra else t.position_ids.to(self.device)
        forward_ids = input_ids
        if extra:  # an image token the policy *sampled* is no image slot; the model would count it as one
            from sapo.models.vl import placeholder_token_ids

            forward_ids = input_ids.clone()
            completion = forward_ids[:, t.prompt_width :]  # a view: [b, C]
            completion[torch.isin(completion, placeholder_token_ids(model, self.device))] = self.pad_token_id
        with self.autocast():
            hidden = hidden_states(
                model, forward_ids, t.attention_mask.to(self.device), position_ids=position_ids, **extra,
            )  # [b, P + C, d]
        P = t.prompt_width
        mask = t.completion_mask.to(self.device)  # [b, C]
        # the hidden state at position j predicts token j + 1
        h = hidden[:, P - 1 : -1][mask]  # [n, d]
        labels = input_ids[:, P:][mask]  # [n]
        return h, labels, mask

    def logprobs(self, model, t: RolloutTensors, *, with_entropy: bool = False):
        """Log-probs [b, C] (float32, 0 where masked) of the completion tokens of rows t, and the
        entropy [b, C] (detached) or None."""
        h, labels, mask = self.hidden(model, t)
        logp_flat, ent_flat = token_logprobs(
            h, output_weight(model), labels, temperature=self.settings.temperature, with_entropy=with_entropy,
            chunk_size=self.settings.chunk_size or None, bias=output_bias(model),
        )
        return unflatten(logp_flat, mask), unflatten(ent_flat.detach(), mask) if ent_flat is not None else None

    def micro_batches(self, tensors: RolloutTensors, rows: torch.Tensor) -> list:
        """(rows, trimmed rows, left) per forward/backward: micro_batch_plan's split of `rows`, each
        part with its all-padding columns dropped (trim_padding; `left` prompt columns)."""
        settings = self.settings
        plan = micro_batch_plan(tensors, rows, max_rows=settings.micro_batch_size, max_tokens=settings.micro_batch_tokens)
        if settings.micro_batch_tokens and distributed.world_size() > 1:
            try:
                plan = split_plan(plan, distributed.global_max(len(plan)))
            except ValueError as err:
                raise ConfigError(str(err)) from err
        return [(micro, *trim_padding(select_rows(tensors, micro))) for micro in plan]

    @torch.no_grad()
    def all_rows(self, model, tensors: RolloutTensors) -> torch.Tensor:
        """Log-probs [N, C] of every row of the rollout, micro-batch by micro-batch (no gradient)."""
        out = torch.zeros(tensors.completion_mask.shape, dtype=torch.float32, device=self.device)  # [N, C]
        for rows, part, _ in self.micro_batches(tensors, torch.arange(tensors.num_rows)):
            logp, _ = self.logprobs(model, part)
            out[rows.to(self.device), : logp.shape[1]] = logp
        return out


def unflatten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[n] values at the True positions of mask [b, C] -> [b, C] float32, 0 elsewhere."""
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_scatter(mask, values.float())


def _stack_extra(extra: list[dict], prompt_width: int, width: int, device) -> dict:
    if not extra:
        return {}
    from sapo.data.multimodal import collate_extra

    return {k: v.to(device) for k, v in collate_extra(extra, width, prompt_width=prompt_width).items()}
