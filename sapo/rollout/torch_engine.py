"""Our PyTorch generation engine over any HF causal LM (Qwen3, Qwen3-MoE, Qwen2, Llama/SmolLM2, Mistral, ...).

One batched prefill over left-padded prompts (position ids counted over real tokens), then one forward
per new token through a KV cache. Rows that produce an EOS token leave the batch: their KV-cache rows,
attention-mask rows and positions are dropped, so later steps only compute on live rows.

Two forwards behind the same loop (same sampling, same generator draws):

- lean (default for the families of ``sapo.rollout.lean_families``: Qwen3, Qwen3-MoE, Qwen2, Llama,
  Mistral text models): ``sapo.rollout.lean_decoder.LeanDecoder``, plain tensor ops on the model's live
  weights, its own preallocated KV cache, prefill on real tokens only; finished rows leave its cache once 1/8
  of the cached rows are finished (``_LeanForward.COMPACT_FRACTION``).
  1.7-2.7x HF ``generate`` on the CPU benchmark (bench/RESULTS.md), against 1.3-2.0x for the HF forward.
- HF forward (``lean=False``, or whatever ``lean_unsupported`` refuses: other architectures, forward hooks
  such as routing record/replay, peft wrappers, sliding windows, multimodal extra inputs, ``compile``).

KV cache of the HF forward: ``cache="static"`` (default) preallocates [B, H, P + max_new_tokens, D] per
layer and writes each step in place; ``cache="dynamic"`` uses HF's ``DynamicCache``, which concatenates
(copies the whole cache) every step. On the 2-core CPU at 64 x 96 tokens the two measured the same (within
noise); the static one avoids a per-step copy that grows with length. Models with sliding-window or
linear-attention layers always use the dynamic one. ``compile=True`` (torch.compile, dynamic shapes) is
checked for equal tokens on CPU only (slow test); CUDA graphs are not implemented.

Multimodal prompts (Qwen3-VL: ``pixel_values``, ``image_grid_thw``, ``mm_token_type_ids`` in
``extra_inputs``): we compute the 3-D mrope positions of the prompts with the model's own
``get_rope_index`` and pass them explicitly, then decode from each row's largest position + 1. The
model's stored ``rope_deltas`` are never used, so dropping finished rows cannot desynchronise them.
Models that take extra inputs but have no ``get_rope_index`` raise NotImplementedError: use
``make_engine("hf", model)`` for those.
"""

from __future__ import annotations

import contextlib
import copy
import inspect

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, LinearAttentionCacheLayerMixin

from sapo.models.routing import is_moe, pad_routing, record_routing, require_routing
from sapo.rollout.base import (
    CopiedWeights,
    LiveWeights,
    RolloutBatch,
    SamplingParams,
    check_generate_args,
    collate_extra_inputs,
    left_pad,
)
from sapo.rollout.lean_decoder import LeanDecoder, lean_unsupported
from sapo.rollout.sampling import sample_tokens


class PreallocatedLayer(DynamicLayer):
    """A KV-cache layer with a fixed-size buffer [B, H, max_len, D]; ``update`` writes in place.

    Subclasses HF's ``DynamicLayer`` so masks and bookkeeping work unchanged; only storage differs.
    """

    def __init__(self, max_len: int):
        super().__init__()
        self.max_len = max_len
        self.length = 0

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            batch, heads, _, head_dim = key_states.shape
            shape = (batch, heads, self.max_len, head_dim)
            self.device = key_states.device
            self.keys = key_states.new_zeros(shape)  # [B, H, L, D]
            self.values = value_states.new_zeros(shape[:3] + value_states.shape[-1:])
            self.is_initialized = True
        end = self.length + key_states.shape[-2]
        self.keys[:, :, self.length : end] = key_states
        self.values[:, :, self.length : end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.keys = self.keys[indices]
            self.values = self.values[indices]


def make_kv_cache(model: torch.nn.Module, max_len: int, kind: str) -> DynamicCache:
    """An HF cache for ``model``: preallocated layers for kind "static" when all layers are full attention."""
    cache = DynamicCache(config=model.config)
    if kind == "static" and all(type(layer) is DynamicLayer for layer in cache.layers) and cache.layers:
        cache.layers = [PreallocatedLayer(max_len) for _ in cache.layers]
    return cache


def _select_rows(cache: DynamicCache, rows: torch.Tensor) -> None:
    for layer in cache.layers:
        if isinstance(layer, LinearAttentionCacheLayerMixin):
            # linear-attention conv / recurrent states (Qwen3-Next, Qwen3.5): their batch_select_indices is
            # missing, or a hybrid layer's (DynamicLayer's) selects only keys / values; reorder_cache
            # index-selects every state along the batch axis
            layer.reorder_cache(rows)
        else:
            layer.batch_select_indices(rows)


def _mrope_model(model: torch.nn.Module) -> torch.nn.Module | None:
    """The inner module with ``get_rope_index`` (Qwen2/2.5/3-VL), or None for text models."""
    inner = getattr(model, "model", None)
    return inner if inner is not None and hasattr(inner, "get_rope_index") else None


GRID_INPUTS = ("image_grid_thw", "video_grid_thw", "mm_token_type_ids", "second_per_grid_ts")


def _mrope_positions(mrope_model, input_ids, attention_mask, extra) -> tuple[torch.Tensor, torch.Tensor]:
    """3-D mrope positions of the left-padded prompts [3, B, P] and each row's next position [B]."""
    grids = {key: value for key, value in extra.items() if key in GRID_INPUTS}
    position_ids, _ = mrope_model.get_rope_index(input_ids, attention_mask=attention_mask, **grids)
    position_ids = position_ids.to(input_ids.device)
    last = position_ids.masked_fill(attention_mask[None] == 0, -1).amax(dim=(0, 2))  # [B], text after image
    return position_ids, last + 1


def _decode_positions(next_position: torch.Tensor, mrope_model: torch.nn.Module | None) -> torch.Tensor:
    """Positions of the token fed this step: [b, 1], or [3, b, 1] for mrope (text tokens: t = h = w)."""
    if mrope_model is None:
        return next_position[:, None]
    return next_position[None, :, None].expand(3, -1, -1)


def _cache_kwarg(model: torch.nn.Module) -> str:
    """transformers >= 5.24 names the cache argument ``cache``; older 5.x call it ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class TorchEngine(LiveWeights):
    """Batched sampling with a KV cache; finished rows leave the batch.

    ``lean=True`` (default) runs Qwen3 / Qwen3-MoE / Qwen2 / Llama / Mistral text models on ``LeanDecoder``
    (plain tensor ops on the model's weights, see ``sapo.rollout.lean_decoder``) and any other model, or
    one of those that it does not support (``lean_unsupported``: hooks such as routing record/replay, peft
    wrappers, short sliding windows, unknown rope types; extra inputs, ``compile=True``), on the HF forward. ``lean=False`` always uses the HF forward.
    ``compile=True`` wraps the HF decode forward in ``torch.compile`` (GPU; the first call is slow).
    ``last_path`` is "lean" or "hf": the path the latest ``generate`` call took.

    ``sampling.record_experts`` (MoE models, R3 routing replay) returns the experts every MoE layer chose
    in ``RolloutBatch.routing``: [L_moe, B, P + max_new_tokens - 1, k] (int8 or int16), the columns of
    ``RolloutBatch.to_padded``, -1 where no token was fed (left padding on the lean path, finished rows,
    the last sampled token): the layout of ``sapo.models.routing.RoutingRecord.experts``, recorded by the
    lean forward itself, or by ``record_routing`` hooks on the HF path.

    It samples the live module it was built around (``load_weights(None, version=v)`` records the
    version); ``OwnCopyTorchEngine`` is the same engine on its own copy of the weights.
    """

    def __init__(self, model: torch.nn.Module, *, cache: str = "static", compile: bool = False, lean: bool = True):
        if cache not in ("static", "dynamic"):
            raise ValueError(f"cache must be 'static' or 'dynamic', got {cache!r}")
        self.model = model
        self.cache_kind = cache
        self.lean = lean and not compile
        self.last_path: str | None = None
        self._forward = torch.compile(model, dynamic=True) if compile else model
        self._cache_kwarg = _cache_kwarg(model)

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams, *,
                 extra_inputs: list[dict] | None = None) -> RolloutBatch:
        check_generate_args(prompt_ids, sampling, extra_inputs)
        if sampling.record_experts and not is_moe(self.model):
            raise ValueError(f"record_experts=True needs an MoE model; {type(self.model).__name__} has no top-k router")
        if sampling.record_experts:  # an MoE router sapo cannot replay: say so before decoding
            require_routing(self.model, "record_experts=True (R3 routing replay)", replay=True)
        mrope_model = _mrope_model(self.model)
        multimodal = extra_inputs is not None and any(extra_inputs)
        if multimodal and mrope_model is None:
            raise NotImplementedError(
                f"the 'torch' engine takes extra_inputs only for mrope models with get_rope_index (Qwen3-VL); "
                f"{type(self.model).__name__} has none: use make_engine('hf', model) for these prompts"
            )
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                (tokens, logprobs, lengths, hit_eos), routing = self._decode(
                    prompt_ids, sampling, extra_inputs if multimodal else None, mrope_model)
        finally:
            self.model.train(was_training)
        tokens, logprobs = tokens.tolist(), logprobs.tolist()
        lengths, hit_eos = lengths.tolist(), hit_eos.tolist()
        return RolloutBatch(
            prompt_ids=[list(p) for p in prompt_ids],
            completion_ids=[row[:n] for row, n in zip(tokens, lengths)],
            sampler_logprobs=[row[:n] for row, n in zip(logprobs, lengths)],
            truncated=[not eos for eos in hit_eos],
            routing=routing,
            policy_version=self.policy_version,
        )

    def _decode(self, prompt_ids, sampling: SamplingParams, extra_inputs, mrope_model):
        device = next(self.model.parameters()).device
        input_ids, prompt_mask = left_pad(prompt_ids, sampling.pad_token_id)  # [B, P], [B, P]
        batch, prompt_len = input_ids.shape
        input_ids, prompt_mask = input_ids.to(device), prompt_mask.to(device)
        max_new_tokens, record_experts = sampling.max_new_tokens, sampling.record_experts
        use_lean = self.lean and extra_inputs is None and lean_unsupported(self.model, prompt_len + max_new_tokens) is None
        self.last_path = "lean" if use_lean else "hf"
        if use_lean:
            forward = _LeanForward(self.model, input_ids, prompt_mask, max_new_tokens, record_experts)
        else:
            forward = _HFForward(self, input_ids, prompt_mask, max_new_tokens, extra_inputs, prompt_ids, mrope_model)
        with record_routing(self.model) if record_experts and not use_lean else contextlib.nullcontext() as record:
            outputs = self._loop(forward, batch, sampling, record)
        routing = None
        if record_experts:
            routing = forward.net.routing if use_lean else pad_routing(record.experts, prompt_len + max_new_tokens - 1)
            routing = routing.cpu()
        return outputs, routing

    def _loop(self, forward, batch, sampling: SamplingParams, record):
        device = forward.input_ids.device
        max_new_tokens = sampling.max_new_tokens
        eos = torch.tensor(sampling.eos_token_ids, dtype=torch.long, device=device)

        out_tokens = torch.full((batch, max_new_tokens), sampling.pad_token_id, dtype=torch.long, device=device)
        out_logprobs = torch.zeros((batch, max_new_tokens), dtype=torch.float32, device=device)
        lengths = torch.full((batch,), max_new_tokens, dtype=torch.long, device=device)
        hit_eos = torch.zeros(batch, dtype=torch.bool, device=device)
        rows = torch.arange(batch, device=device)  # output row of each live batch row

        logits = forward.prefill()  # [B, V]
        for step in range(max_new_tokens):
            token, logprob = sample_tokens(
                logits, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                greedy=sampling.greedy, generator=sampling.generator,
            )  # [b], [b]
            out_tokens[rows, step] = token
            out_logprobs[rows, step] = logprob
            finished = torch.isin(token, eos)  # [b]
            if finished.any():  # one host sync per step; it decides whether the batch shrinks
                done_rows = rows[finished]
                lengths[done_rows] = step + 1
                hit_eos[done_rows] = True
                keep = (~finished).nonzero().squeeze(1)  # [b']
                if keep.numel() == 0 or step == max_new_tokens - 1:
                    break
                rows, token = rows[keep], token[keep]
                forward.select_rows(keep)  # finished rows leave the KV cache: later steps skip them
                if record is not None:
                    record.select_rows(rows)  # the hooks' record: later forwards cover these rows only
            if step == max_new_tokens - 1:
                break
            logits = forward.decode(token, step, rows)  # [b, V]
        return out_tokens.cpu(), out_logprobs.cpu(), lengths.cpu(), hit_eos.cpu()


class OwnCopyTorchEngine(CopiedWeights, TorchEngine):
    """``TorchEngine`` on its own frozen copy of the policy: it samples the weights last given to
    ``load_weights`` (a stale policy on purpose, or a copy on another device), never the trainer's
    module mid-update."""

    def __init__(self, model: torch.nn.Module, **options):
        own = copy.deepcopy(model).eval()
        for p in own.parameters():
            p.requires_grad_(False)
        super().__init__(own, **options)


class _LeanForward:
    """Prefill / decode / row selection on ``LeanDecoder``.

    Finished rows are dropped from the KV cache lazily: a compaction copies every layer's cache, so it
    waits until a fraction ``COMPACT_FRACTION`` of the cached rows are finished; until then those rows
    still run through the layers (their outputs are ignored) and only live rows reach the LM head.
    """

    COMPACT_FRACTION = 0.125

    def __init__(self, model, input_ids, prompt_mask, max_new_tokens, record_experts):
        self.input_ids, self.prompt_mask = input_ids, prompt_mask
        self.net = LeanDecoder(model, input_ids.shape[0], input_ids.shape[1] + max_new_tokens, record_experts)
        self.positions = prompt_mask.sum(-1)  # [B'] next position of each cached row (real tokens only)
        self.live = torch.arange(input_ids.shape[0], device=input_ids.device)  # cached row of each live row
        self.tokens = torch.zeros_like(self.positions)  # [B'] input tokens of the cached rows

    def prefill(self) -> torch.Tensor:
        return self.net.prefill(self.input_ids, self.prompt_mask)

    def select_rows(self, keep: torch.Tensor) -> None:
        self.live = self.live[keep]
        cached = self.positions.shape[0]
        if (cached - self.live.shape[0]) >= self.COMPACT_FRACTION * cached:
            self.net.select_rows(self.live)
            self.positions = self.positions[self.live]
            self.tokens = self.tokens[: self.live.shape[0]]
            self.live = torch.arange(self.live.shape[0], device=self.live.device)

    def decode(self, token: torch.Tensor, step: int, rows: torch.Tensor) -> torch.Tensor:
        self.tokens[self.live] = token
        logits = self.net.decode(self.tokens, self.positions, self.live, rows)  # [b, V], live rows only
        self.positions = self.positions + 1
        return logits


class _HFForward:
    """Prefill / decode / row selection through the HF model forward and an HF cache."""

    def __init__(self, engine, input_ids, prompt_mask, max_new_tokens, extra_inputs, prompt_ids, mrope_model):
        self.engine, self.model, self.mrope_model = engine, engine.model, mrope_model
        self.input_ids, self.prompt_len = input_ids, input_ids.shape[1]
        self.attention_mask = F.pad(prompt_mask, (0, max_new_tokens))  # [B, P+N], a column set per step
        self.cache = make_kv_cache(self.model, self.prompt_len + max_new_tokens, engine.cache_kind)
        self.extra_inputs, self.prompt_ids = extra_inputs, prompt_ids

    def prefill(self) -> torch.Tensor:
        prompt_mask = self.attention_mask[:, : self.prompt_len]
        prefill = {"input_ids": self.input_ids, "attention_mask": prompt_mask, "use_cache": True,
                   "logits_to_keep": 1, self.engine._cache_kwarg: self.cache}
        if self.extra_inputs is None:
            prefill["position_ids"] = (prompt_mask.cumsum(-1) - 1).clamp(min=0)  # [B, P]
            self.next_position = prefill["position_ids"][:, -1] + 1  # [B]
        else:
            extra = collate_extra_inputs(self.extra_inputs, [len(p) for p in self.prompt_ids], self.input_ids.device)
            prefill.update(extra)
            prefill["position_ids"], self.next_position = _mrope_positions(
                self.mrope_model, self.input_ids, prompt_mask, extra
            )  # [3, B, P], [B]
        logits = self.model(**prefill).logits[:, -1]  # [B, V]
        # A decode query attends to every cached real token, so with full attention only (no sliding
        # window) the mask is just the padding mask; handing sdpa a ready [b, 1, 1, W] boolean mask skips
        # HF's per-step mask building (~12% of a decode step on CPU).
        self.ready_mask = getattr(self.model.config, "_attn_implementation", None) == "sdpa" and all(
            isinstance(layer, PreallocatedLayer) for layer in self.cache.layers
        )
        return logits

    def select_rows(self, keep: torch.Tensor) -> None:
        self.next_position = self.next_position[keep]
        self.attention_mask = self.attention_mask[keep]
        _select_rows(self.cache, keep)

    def decode(self, token: torch.Tensor, step: int, rows: torch.Tensor) -> torch.Tensor:
        width = self.prompt_len + step + 1
        self.attention_mask[:, width - 1] = 1
        mask = self.attention_mask
        step_mask = mask[:, None, None, :width].bool() if self.ready_mask else mask[:, :width]
        logits = self.engine._forward(
            input_ids=token[:, None], attention_mask=step_mask,
            position_ids=_decode_positions(self.next_position, self.mrope_model), use_cache=True,
            **{self.engine._cache_kwarg: self.cache},
        ).logits[:, -1]  # [b, V]
        self.next_position = self.next_position + 1
        return logits
