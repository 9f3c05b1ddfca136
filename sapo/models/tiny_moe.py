"""Tiny configs of every Mixture-of-Experts family `sapo.models.moe_families` knows, for tests and CI.

Each builds offline in well under a second and runs a [4, 12] forward in milliseconds on a CPU:
hidden 32, 2 layers, 4 attention heads of 8, 4 or 8 experts of width 32, top-2. Overrides replace any
config field. `build_tiny_moe` also gives DeepSeek-V3 / GLM-4-MoE a random `e_score_correction_bias`
(the checkpoints' buffer is trained, the fresh one is zeros), so a test sees a replay that wrongly adds
the bias to the gate weights.

The Qwen3-MoE and Qwen3-VL-MoE configs are `sapo.models.tiny`'s (`build_tiny_model`).
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, PretrainedConfig

from sapo.models.tiny import DEFAULT_EXPERTS_IMPLEMENTATION, build_tiny_model

_ATTENTION: dict[str, Any] = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    max_position_embeddings=512, tie_word_embeddings=True, rms_norm_eps=1e-6,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,  # sapo.models.char_tokenizer's special ids
)
# the HF defaults would add a load-balancing loss, and generate() crashes on output_router_logits in some 5.x
_NO_AUX = dict(router_aux_loss_coef=0.0, output_router_logits=False)
# config class, fields (merged over _ATTENTION)
_FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral": ("MixtralConfig", dict(
        intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, **_NO_AUX)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(
        intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4,
        num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[], **_NO_AUX)),
    "olmoe": ("OlmoeConfig", dict(
        intermediate_size=32, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False, **_NO_AUX)),
    "qwen3_5_moe": ("Qwen3_5MoeTextConfig", dict(
        moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
        layer_types=["linear_attention", "full_attention"], linear_conv_kernel_dim=2, linear_key_head_dim=8,
        linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4, **_NO_AUX)),
    "qwen3_next": ("Qwen3NextConfig", dict(
        intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4,
        num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        layer_types=["linear_attention", "full_attention"], linear_conv_kernel_dim=2, linear_key_head_dim=8,
        linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4, **_NO_AUX)),
    "deepseek_v3": ("DeepseekV3Config", dict(
        intermediate_size=64, moe_intermediate_size=32, n_routed_experts=8, n_group=2, topk_group=1,
        num_experts_per_tok=2, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        first_k_dense_replace=0, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4,
        v_head_dim=8, head_dim=4, rope_interleave=True, num_key_value_heads=4)),  # MLA: K/V per head
    "glm4_moe": ("Glm4MoeConfig", dict(
        intermediate_size=64, moe_intermediate_size=32, n_routed_experts=8, n_group=2, topk_group=1,
        num_experts_per_tok=2, n_shared_experts=1, routed_scaling_factor=1.5, norm_topk_prob=True,
        first_k_dense_replace=0, partial_rotary_factor=0.5, use_qk_norm=True)),
    "gpt_oss": ("GptOssConfig", dict(
        intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], rope_parameters={"rope_type": "default", "rope_theta": 1e4},
        **_NO_AUX)),
    "flex_olmo": ("FlexOlmoConfig", dict(
        intermediate_size=32, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, **_NO_AUX)),
    "minimax": ("MiniMaxConfig", dict(
        intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, block_size=4,
        layer_types=["linear_attention", "full_attention"], **_NO_AUX)),
    "dots1": ("Dots1Config", dict(
        intermediate_size=64, moe_intermediate_size=32, n_routed_experts=8, n_group=2, topk_group=1,
        num_experts_per_tok=2, n_shared_experts=1, routed_scaling_factor=2.0, norm_topk_prob=False,
        first_k_dense_replace=0, layer_types=["full_attention", "full_attention"])),
    "glm4_moe_lite": ("Glm4MoeLiteConfig", dict(
        intermediate_size=64, moe_intermediate_size=32, n_routed_experts=8, n_group=2, topk_group=1,
        num_experts_per_tok=2, n_shared_experts=1, routed_scaling_factor=1.8, norm_topk_prob=True,
        mlp_layer_types=["sparse", "sparse"], q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4,
        qk_nope_head_dim=4, v_head_dim=8, num_key_value_heads=4)),
}
FAMILIES = ("qwen3_moe", "qwen3_vl_moe", *_FAMILIES)


def tiny_moe_config(family: str, vocab_size: int, **overrides: Any) -> PretrainedConfig:
    """The config of a tiny `family` model (a key of FAMILIES other than the two Qwen3 ones)."""
    if family not in _FAMILIES:
        raise ValueError(f"unknown tiny MoE family {family!r}; choose one of {tuple(_FAMILIES)}")
    class_name, fields = _FAMILIES[family]
    config_class = getattr(transformers, class_name)
    experts_implementation = overrides.pop("experts_implementation", DEFAULT_EXPERTS_IMPLEMENTATION)
    return config_class(vocab_size=vocab_size, experts_implementation=experts_implementation,
                        **{**_ATTENTION, **fields, **overrides})


def build_tiny_moe(family: str, vocab_size: int, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A freshly initialised tiny `family` causal LM (float32), reproducible from `seed`."""
    if family in ("qwen3_moe", "qwen3_vl_moe"):
        small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=8, num_experts=4, moe_intermediate_size=32)
        if family == "qwen3_vl_moe":
            small = dict(num_experts=4, moe_intermediate_size=32)  # its text model is already small
        return build_tiny_model(family, vocab_size, seed=seed, **{**small, **overrides})
    config = tiny_moe_config(family, vocab_size, **overrides)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config)
        with torch.no_grad():
            for module in model.modules():
                bias = getattr(module, "e_score_correction_bias", None)
                if isinstance(bias, torch.Tensor):
                    bias.copy_(0.1 * torch.randn(bias.shape))
    finally:
        torch.random.set_rng_state(state)
    return model
