"""The rollout seam: what every generation engine takes, returns, and how its weights are kept current.

    sampling = SamplingParams(max_new_tokens=48, eos_token_ids=(2,), pad_token_id=0, temperature=1.0,
                              top_p=1.0, top_k=0, generator=torch.Generator().manual_seed(0))
    batch = engine.generate(prompt_ids, sampling, extra_inputs=None)   # -> RolloutBatch
    engine.load_weights(state_or_None, version=step)                    # after the step's updates

``SamplingParams`` is the one description of a sampling distribution: training rollouts and evaluation
build it the same way (``SamplingParams.greedy_variant`` for greedy decoding), so evaluation never samples
from another distribution than training by accident.

``RolloutBatch`` carries what the trainer may need from the sampler: the completions, the sampler's
log-probs of the sampled tokens, the MoE experts chosen at every fed position (``routing``, only when
``sampling.record_experts``), and ``policy_version``: the optimizer step of the weights that sampled it
(0 = the initial weights). The trainer's ratio is taken against the policy that really sampled.

Weights
-------
An engine either samples the trainer's live module (``owns_weights = False``: ``load_weights(None,
version=v)`` only records the version) or keeps its own copy (``owns_weights = True``: another process,
another device, vLLM; ``load_weights(named_tensors, version=v)`` copies the trainer's weights in). The
loop calls ``load_weights`` after every step's updates, so the version stamped on a batch always says
which weights produced it. Engines are registered by name (``sapo.rollout.registry``).

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
own torch), so no vLLM code ships here. It would be one more registered engine with ``owns_weights =
True``: ``load_weights`` pushes the named tensors into the vLLM worker's model (``load_weights`` when
colocated, an NCCL broadcast to a separate server) and resets vLLM's prefix cache, whose KV entries
were computed with the old weights; ``generate`` asks for the sampled token's log-prob
(``SamplingParams(logprobs=0)`` there, configured to report the tempered, unfiltered distribution
above), one vLLM seed per prompt drawn from ``sampling.generator``, and multimodal prompts as
``multi_modal_data``. Its kernels differ from the trainer's: measure the mismatch against a
teacher-forced forward, as the tests here do for our engines.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to sample: the same object for training rollouts and evaluation.

    ``generator`` is the random stream the engine draws from (None: torch's global RNG); it is state,
    not a setting, so it takes no part in equality. ``record_experts`` asks an MoE-capable engine to
    return the experts chosen at every fed position (routing replay R3).
    """

    max_new_tokens: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    record_experts: bool = False
    generator: torch.Generator | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in self.eos_token_ids))
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (use greedy=True for argmax decoding), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not self.eos_token_ids:
            raise ValueError("eos_token_ids is empty: pass the tokenizer's end-of-sequence id(s)")

    def replace(self, **changes) -> SamplingParams:
        return dataclasses.replace(self, **changes)

    def greedy_variant(self) -> SamplingParams:
        """Argmax decoding with the same limits (log-probs reported at temperature 1, no stream)."""
        return self.replace(greedy=True, temperature=1.0, generator=None)


@dataclass
class RolloutBatch:
    """Completions for a batch of prompts, in prompt order.

    completion_ids include the EOS token when one was produced; ``truncated[i]`` is True when row i hit
    ``max_new_tokens`` without producing an EOS token. ``routing`` (with ``record_experts``):
    [L_moe, B, P + max_new_tokens - 1, k] int8/int16, the columns of ``to_padded`` (P = longest prompt),
    -1 where no token was fed (left padding, finished rows, the last sampled token).
    ``policy_version``: the optimizer step of the weights that sampled the batch.
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    sampler_logprobs: list[list[float]]
    truncated: list[bool]
    routing: torch.Tensor | None = None
    policy_version: int = 0

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
        if self.routing is not None and (self.routing.dim() != 4 or self.routing.shape[1] != n):
            raise ValueError(f"routing must be [L, B={n}, T, k], got {tuple(self.routing.shape)}")

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
    """Anything that samples completions from a policy and can be told about new weights."""

    owns_weights: bool  # True: it samples its own copy, which load_weights refreshes
    policy_version: int  # the optimizer step of the weights it samples now

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams, *,
                 extra_inputs: list[dict] | None = None) -> RolloutBatch: ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]] | None, *, version: int) -> None: ...


class LiveWeights:
    """Weight handling of an engine that samples the trainer's own module (nothing to copy)."""

    owns_weights = False
    policy_version = 0

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]] | None, *, version: int) -> None:
        if weights is not None:
            raise ValueError(f"{type(self).__name__} samples the live model: call load_weights(None, version=...) "
                             "(there is no copy to refresh)")
        self.policy_version = int(version)


class CopiedWeights:
    """Weight handling of an engine that samples its own copy of the policy (``self.model``).

    ``load_weights(named_tensors, version=v)`` copies the given tensors in by name; a subset is fine
    (LoRA: only the adapters change). Names are the trainer model's ``state_dict`` names."""

    owns_weights = True
    policy_version = 0
    model: torch.nn.Module

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]] | None, *, version: int) -> None:
        if weights is None:
            raise ValueError(f"{type(self).__name__} samples its own copy of the weights: pass the trainer's "
                             "(name, tensor) pairs to load_weights")
        own = self.model.state_dict()
        for name, tensor in weights:
            if name not in own:
                raise KeyError(f"load_weights: {name!r} is not a weight of the engine's model "
                               f"({type(self.model).__name__}); pass the trainer model's state_dict names")
            own[name].copy_(tensor.detach())
        self.policy_version = int(version)


def check_generate_args(prompt_ids: list[list[int]], sampling: SamplingParams, extra_inputs: list[dict] | None) -> None:
    """Validate the per-call arguments shared by every engine; raise ValueError saying what is allowed
    (SamplingParams validates itself when built)."""
    if not isinstance(sampling, SamplingParams):
        raise TypeError(f"sampling must be a sapo.rollout.SamplingParams, got {type(sampling).__name__}")
    if not prompt_ids:
        raise ValueError("prompt_ids is empty: pass at least one prompt")
    for i, prompt in enumerate(prompt_ids):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
    if extra_inputs is not None and len(extra_inputs) != len(prompt_ids):
        raise ValueError(
            f"extra_inputs must have one dict per prompt ({len(prompt_ids)}), got {len(extra_inputs)}"
        )
