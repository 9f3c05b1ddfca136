"""Tiny built-in model configs (Qwen3 family) that build offline and train in seconds on a CPU.

Sizes (vocab 64, tied embeddings):
- `qwen3_moe`: hidden 128, 4 layers, 8 experts top-2 of width 128 -> ~1.8M parameters,
  ~0.6M active per token.
- `qwen3`: the dense counterpart with the same *active* size: its MLP width 256 equals
  top-2 x expert width 128, so per token it does the same arithmetic as `qwen3_moe`.
- `qwen3_vl` / `qwen3_vl_moe`: text hidden 64, 2 layers, head_dim 16, mrope_section [2, 3, 3];
  vision depth 2, hidden 32, patch 16, spatial merge 2, temporal patch 2, out hidden 64.
  The last four ids of the vocabulary are reserved for <vision_start>, <vision_end>, <image>,
  <video> (pass a vocab_size four larger than the tokenizer's).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    PretrainedConfig,
    Qwen3Config,
    Qwen3MoeConfig,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)

ARCHS = ("qwen3", "qwen3_moe", "qwen3_vl", "qwen3_vl_moe")

# "grouped_mm" runs the fused expert tensors as one grouped matmul: fast on CPU and the same
# outputs as "eager" (tests/models/test_tiny.py); "batched_mm" is ~50x slower on CPU.
DEFAULT_EXPERTS_IMPLEMENTATION = "grouped_mm"

_TEXT_COMMON: dict[str, Any] = dict(
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    rms_norm_eps=1e-6,
)
_MOE: dict[str, Any] = dict(
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=128,
    norm_topk_prob=True,  # as in the released Qwen3-MoE checkpoints
    decoder_sparse_step=1,
    router_aux_loss_coef=0.0,  # the HF default 0.001 would silently add a load-balancing loss
    output_router_logits=False,  # transformers 5.17 generate() crashes when the config sets it
)
_VL_TEXT: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=2048,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
)
_VL_MOE_TEXT: dict[str, Any] = dict(_MOE, num_experts=4, moe_intermediate_size=64)
_VISION: dict[str, Any] = dict(
    depth=2,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    patch_size=16,
    spatial_merge_size=2,
    temporal_patch_size=2,
    out_hidden_size=64,
    num_position_embeddings=64,
    deepstack_visual_indexes=[1],
)
_VL_TOP_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


def tiny_config(arch: str, vocab_size: int, **overrides: Any) -> PretrainedConfig:
    """The config of a tiny `arch` model; `overrides` replace any text-model field.

    For the VL archs, `overrides` go to the text config, except `vision_config` (a dict merged into
    the vision config) and the four vision token ids, which go to the top-level config.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose one of {ARCHS}")
    if vocab_size < 8:
        raise ValueError(f"vocab_size must be at least 8, got {vocab_size}")
    experts_implementation = overrides.pop("experts_implementation", DEFAULT_EXPERTS_IMPLEMENTATION)

    if arch == "qwen3":
        fields = dict(_TEXT_COMMON, intermediate_size=2 * _MOE["moe_intermediate_size"])
        return Qwen3Config(vocab_size=vocab_size, **{**fields, **overrides})
    if arch == "qwen3_moe":
        fields = dict(_TEXT_COMMON, intermediate_size=256, **_MOE)
        return Qwen3MoeConfig(
            vocab_size=vocab_size, experts_implementation=experts_implementation, **{**fields, **overrides}
        )

    vision = dict(_VISION, **overrides.pop("vision_config", {}))
    top = {key: overrides.pop(key) for key in _VL_TOP_KEYS if key in overrides}
    start = vocab_size - 4  # the reserved ids, in the order of _VL_TOP_KEYS' defaults below
    top = {
        "vision_start_token_id": start,
        "vision_end_token_id": start + 1,
        "image_token_id": start + 2,
        "video_token_id": start + 3,
        **top,
    }
    text = dict(_VL_TEXT, vocab_size=vocab_size, tie_word_embeddings=True)
    if arch == "qwen3_vl":
        return Qwen3VLConfig(
            text_config={**text, **overrides}, vision_config=vision, tie_word_embeddings=True, **top
        )
    text = dict(text, **_VL_MOE_TEXT)
    config = Qwen3VLMoeConfig(
        text_config={**text, **overrides},
        vision_config=vision,
        tie_word_embeddings=True,
        experts_implementation=experts_implementation,
        **top,
    )
    return config


def build_tiny_model(arch: str, vocab_size: int, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A freshly initialised tiny model (float32, eval mode off), reproducible from `seed`."""
    config = tiny_config(arch, vocab_size, **overrides)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if arch == "qwen3_vl":
            model = Qwen3VLForConditionalGeneration(config)
        elif arch == "qwen3_vl_moe":
            model = Qwen3VLMoeForConditionalGeneration(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.random.set_rng_state(generator_state)
    return model


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Total parameters and the parameters one token uses (`active`: only top-k of the experts)."""
    total = sum(p.numel() for p in model.parameters())
    config = getattr(model.config, "text_config", model.config)
    num_experts = getattr(config, "num_experts", 0) or 0
    expert_params = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    active = total
    if num_experts:
        active = total - expert_params + expert_params * config.num_experts_per_tok // num_experts
    return {"total": total, "active": active}
