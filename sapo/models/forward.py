"""The policy forward without logits: last hidden states and the output projection.

`sapo.ops` turns `hidden [N, d]` and `output_weight(model) [V, d]` into log-probs chunk by chunk,
so the full `[B, T, V]` logits tensor is never built. `hidden @ W.T (+ bias)` equals the model's
own logits (tests/models/test_forward.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The HF model under a peft wrapper (LoRA layers stay injected and active), else `model`."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def decoder_model(model: nn.Module) -> nn.Module:
    """The backbone that ends with the final norm (`model.model` for Qwen3/Llama/Qwen3-VL)."""
    base = unwrap_peft(model)
    prefix = getattr(base, "base_model_prefix", "model")
    decoder = getattr(base, prefix, None)
    if decoder is None or decoder is base or not isinstance(decoder, nn.Module):
        raise ValueError(
            f"{type(base).__name__} has no backbone attribute {prefix!r}: pass a *ForCausalLM or "
            "*ForConditionalGeneration model (optionally wrapped by peft)"
        )
    return decoder


def hidden_states(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **extra: Any
) -> torch.Tensor:
    """Last hidden state after the final norm, `[B, T, d]`, without computing the lm_head.

    `extra` goes to the backbone unchanged (e.g. `pixel_values`, `image_grid_thw`,
    `mm_token_type_ids` for Qwen3-VL, or `position_ids`).
    """
    extra.setdefault("use_cache", False)
    outputs = decoder_model(model)(input_ids=input_ids, attention_mask=attention_mask, **extra)
    return outputs.last_hidden_state  # [B, T, d]


def _output_layer(model: nn.Module) -> nn.Module:
    base = unwrap_peft(model)
    config = getattr(base, "config", None)
    text_config = getattr(config, "text_config", config)
    for name in ("final_logit_softcapping", "logit_scale"):
        value = getattr(text_config, name, None)
        if value not in (None, 1.0):
            raise NotImplementedError(
                f"{type(base).__name__} rescales its logits ({name}={value}); hidden @ W.T would not "
                "equal its logits, so this model is not supported by the hidden-state path"
            )
    head = base.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(base).__name__} has no output embeddings (lm_head)")
    if not isinstance(getattr(head, "weight", None), torch.Tensor) or head.weight.dim() != 2:
        raise ValueError(
            f"lm_head of {type(base).__name__} is {type(head).__name__} without a plain [V, d] weight; "
            "do not put LoRA on lm_head (leave it out of target_modules)"
        )
    return head


def output_weight(model: nn.Module) -> torch.Tensor:
    """The lm_head weight `[V, d]` (the embedding matrix itself when tied)."""
    return _output_layer(model).weight


def output_bias(model: nn.Module) -> torch.Tensor | None:
    """The lm_head bias `[V]`, or None (Qwen3 and Llama have none)."""
    return getattr(_output_layer(model), "bias", None)
