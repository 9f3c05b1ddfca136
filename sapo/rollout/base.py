"""The rollout interface: what every generation engine takes and returns.

An engine is built around the live policy model (``Engine(model)``) so that it always samples from the
current weights; there is no copy to keep in sync. ``generate`` runs under ``torch.inference_mode`` with
the model switched to eval mode, and puts the model back in train mode afterwards if it was training.

Sampler log-probs
-----------------
``sampler_logprobs[i][t]`` is ``log_softmax(logits / temperature)[token]`` for the t-th completion
token of row i: the *tempered, unfiltered* distribution. It is what the trainer recomputes by teacher
forcing (divide the logits by the same temperature), so ``sampler_logprobs`` are directly comparable to
the training-side log-probs (train/inference mismatch diagnostics, truncated importance sampling).
With ``top_k``/``top_p`` the token is actually drawn from the filtered, renormalised distribution; its
log-prob there is ``sampler_logprob - log(kept probability mass)``. With ``greedy=True`` the reported
value is still ``log_softmax(logits / temperature)`` of the argmax token.

A vLLM engine (not shipped)
---------------------------
vLLM cannot be installed or tested on the machines this project runs on (a CUDA-only wheel that pins its
own torch), so no vLLM code ships here. It would plug in as one more class with this ``generate`` and one
more entry in ``make_engine``:
(1) weights sync: vLLM holds its own copy of the weights, so after every optimizer step the engine must
push the policy's state dict into the vLLM model (``load_weights`` on the worker's model when colocated,
or an NCCL broadcast to a separate vLLM server), then reset vLLM's prefix cache, whose KV entries were
computed with the old weights; without the sync it samples from a stale policy.
(2) log-probs: ask for the sampled token's log-prob (``SamplingParams(logprobs=0)``) and configure which
distribution vLLM reports so it matches the definition above (after temperature, before top-k/top-p);
vLLM's kernels differ from the trainer's, so expect small train/inference mismatches and measure them
against a teacher-forced forward, as the tests here do for our engines.
(3) seeds: one ``SamplingParams(seed=...)`` per prompt, drawn from our ``torch.Generator``.
(4) multimodal prompts go in as vLLM's ``multi_modal_data`` with the raw images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class RolloutBatch:
    """Completions for a batch of prompts, in prompt order.

    completion_ids include the EOS token when one was produced; ``truncated[i]`` is True when row i hit
    ``max_new_tokens`` without producing an EOS token.
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    sampler_logprobs: list[list[float]]
    truncated: list[bool]

    def __post_init__(self) -> None:
        n = len(self.prompt_ids)
        if not (len(self.completion_ids) == len(self.sampler_logprobs) == len(self.truncated) == n):
            raise ValueError(
                f"RolloutBatch fields must have one entry per prompt ({n}); got completion_ids "
                f"{len(self.completion_ids)}, sampler_logprobs {len(self.sampler_logprobs)}, "
                f"truncated {len(self.truncated)}"
            )
        for i, (ids, logps) in enumerate(zip(self.completion_ids, self.sampler_logprobs)):
            if len(ids) != len(logps):
                raise ValueError(f"row {i}: {len(ids)} completion tokens but {len(logps)} sampler log-probs")

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_completion_tokens(self) -> int:
        return sum(len(ids) for ids in self.completion_ids)

    def to_padded(self, pad_id: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Pack prompt + completion into tensors: prompts left-padded, completions right-padded.

        Returns input_ids, attention_mask, completion_mask [B, P+C] (P = longest prompt, C = longest
        completion), position_ids [B, P+C] (counted over real tokens) and sampler_logprobs [B, P+C]
        (0 outside the completion). Column P is the first completion token in every row.
        """
        prompt_len = max((len(p) for p in self.prompt_ids), default=0)
        completion_len = max((len(c) for c in self.completion_ids), default=0)
        batch, width = len(self), prompt_len + completion_len
        input_ids = torch.full((batch, width), pad_id, dtype=torch.long)  # [B, P+C]
        attention_mask = torch.zeros((batch, width), dtype=torch.long)  # [B, P+C]
        completion_mask = torch.zeros((batch, width), dtype=torch.long)  # [B, P+C]
        logprobs = torch.zeros((batch, width), dtype=torch.float32)  # [B, P+C]
        for i, (prompt, completion, logps) in enumerate(
            zip(self.prompt_ids, self.completion_ids, self.sampler_logprobs)
        ):
            start, end = prompt_len - len(prompt), prompt_len + len(completion)
            input_ids[i, start:prompt_len] = torch.tensor(prompt, dtype=torch.long)
            input_ids[i, prompt_len:end] = torch.tensor(completion, dtype=torch.long)
            attention_mask[i, start:end] = 1
            completion_mask[i, prompt_len:end] = 1
            logprobs[i, prompt_len:end] = torch.tensor(logps, dtype=torch.float32)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, P+C]
        out = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "completion_mask": completion_mask,
            "position_ids": position_ids,
            "sampler_logprobs": logprobs,
        }
        return {name: tensor.to(device) for name, tensor in out.items()}


# Extra inputs with one entry per prompt token: left-padded with 0 like the prompt.
TOKEN_ALIGNED_INPUTS = ("mm_token_type_ids", "token_type_ids")


def left_pad(prompt_ids: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts to the longest one: input_ids [B, P] and attention_mask [B, P] (1 on real tokens)."""
    prompt_len = max(len(p) for p in prompt_ids)
    input_ids = torch.full((len(prompt_ids), prompt_len), pad_token_id, dtype=torch.long)  # [B, P]
    attention_mask = torch.zeros((len(prompt_ids), prompt_len), dtype=torch.long)  # [B, P]
    for i, prompt in enumerate(prompt_ids):
        input_ids[i, prompt_len - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[i, prompt_len - len(prompt) :] = 1
    return input_ids, attention_mask


def collate_extra_inputs(extra_inputs: list[dict], prompt_lengths: list[int], device) -> dict:
    """Merge per-row extra inputs: token-aligned ones are left-padded to [B, P], others concatenated on dim 0."""
    prompt_len = max(prompt_lengths)
    keys = sorted({key for row in extra_inputs for key in row})
    merged = {}
    for key in keys:
        if key in TOKEN_ALIGNED_INPUTS:
            padded = torch.zeros((len(extra_inputs), prompt_len), dtype=torch.long)  # [B, P]
            for i, (row, length) in enumerate(zip(extra_inputs, prompt_lengths)):
                if key in row:
                    values = torch.as_tensor(row[key]).reshape(-1)
                    if values.numel() != length:
                        raise ValueError(f"extra_inputs[{i}][{key!r}] has {values.numel()} ids, prompt has {length}")
                    padded[i, prompt_len - length :] = values
            merged[key] = padded.to(device)
        else:
            merged[key] = torch.cat([torch.as_tensor(row[key]) for row in extra_inputs if key in row]).to(device)
    return merged


class RolloutEngine(Protocol):
    """Anything that samples completions from the live model."""

    def generate(
        self,
        prompt_ids: list[list[int]],
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        eos_token_ids: list[int],
        pad_token_id: int,
        greedy: bool = False,
        generator: torch.Generator | None = None,
        extra_inputs: list[dict] | None = None,
    ) -> RolloutBatch: ...


def check_generate_args(
    prompt_ids: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    eos_token_ids: list[int],
    extra_inputs: list[dict] | None,
) -> None:
    """Validate the arguments shared by every engine; raise ValueError saying what is allowed."""
    if not prompt_ids:
        raise ValueError("prompt_ids is empty: pass at least one prompt")
    for i, prompt in enumerate(prompt_ids):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (use greedy=True for argmax decoding), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if not eos_token_ids:
        raise ValueError("eos_token_ids is empty: pass the tokenizer's end-of-sequence id(s)")
    if extra_inputs is not None and len(extra_inputs) != len(prompt_ids):
        raise ValueError(
            f"extra_inputs must have one dict per prompt ({len(prompt_ids)}), got {len(extra_inputs)}"
        )
