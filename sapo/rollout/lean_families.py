"""The decoder families the lean decode path runs, what differs between them, and what it refuses.

All five families are the same pre-norm decoder: RMSNorm -> attention (q/k/v/o projections, RoPE,
grouped-query heads) -> residual -> RMSNorm -> SwiGLU MLP (or a top-k mixture of SwiGLU experts) ->
residual, then a final RMSNorm and the LM head. What differs, and where the lean forward reads it:

| family     | q/k RMSNorm per head | projection biases                  | MoE | sliding window read from      |
|------------|----------------------|------------------------------------|-----|-------------------------------|
| qwen3      | yes                  | q/k/v/o when ``attention_bias``    | no  | ``self_attn.sliding_window``  |
| qwen3_moe  | yes                  | q/k/v/o when ``attention_bias``    | yes | ``self_attn.sliding_window``  |
| qwen2      | no                   | q/k/v always, o never              | no  | ``self_attn.sliding_window``  |
| llama      | no                   | q/k/v/o ``attention_bias``, MLP ``mlp_bias`` | no | none (full attention)  |
| mistral    | no                   | none                               | no  | ``config.sliding_window``     |

Biases are read from the ``nn.Linear`` modules themselves, so whichever of them exist are applied.
Tied embeddings (SmolLM2, small Qwen models) need nothing: the LM head weight is the embedding tensor.
Rope variants come from the model's own ``rotary_emb`` (cos/sin tabulated over positions, including its
``attention_scaling``), so every rope type whose cos/sin depend on the position only is exact; those
that depend on the sequence length (dynamic, longrope) or that we have not checked are refused.

``lean_unsupported(model, total_len)`` says why a model cannot run on the lean path (None when it can).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.utils import parametrize


@dataclass(frozen=True)
class Family:
    """What one decoder family adds to the shared layer (see the module docstring's table)."""

    model_type: str
    class_name: str  # the exact *ForCausalLM class; a subclass or a wrapper (peft) is refused
    qk_norm: bool  # RMSNorm over each q and k head before RoPE (q_norm / k_norm modules)
    moe: bool  # MLP may be a top-k router over fused 3-D experts
    window_in_config: bool  # sliding window is config.sliding_window on every layer (Mistral), not per module


FAMILIES = {
    family.class_name: family
    for family in (
        Family("qwen3", "Qwen3ForCausalLM", qk_norm=True, moe=False, window_in_config=False),
        Family("qwen3_moe", "Qwen3MoeForCausalLM", qk_norm=True, moe=True, window_in_config=False),
        Family("qwen2", "Qwen2ForCausalLM", qk_norm=False, moe=False, window_in_config=False),
        Family("llama", "LlamaForCausalLM", qk_norm=False, moe=False, window_in_config=False),
        Family("mistral", "MistralForCausalLM", qk_norm=False, moe=False, window_in_config=True),
    )
}
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# cos/sin depend on the position only (checked against HF generate in tests/rollout/test_lean_decoder.py)
EXACT_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# Child modules each layer must have exactly: anything more would be a module the lean path does not run.
LAYER_CHILDREN = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
ATTENTION_CHILDREN = {"q_proj", "k_proj", "v_proj", "o_proj"}
DENSE_MLP_CHILDREN = {"gate_proj", "up_proj", "down_proj", "act_fn"}
MOE_MLP_CHILDREN = {"gate", "experts"}


def family_of(model: torch.nn.Module) -> Family | None:
    return FAMILIES.get(type(model).__name__)


def sliding_window(family: Family, config, attention: torch.nn.Module) -> int | None:
    """The sliding window of one attention layer (None: full attention)."""
    if family.window_in_config:
        return getattr(config, "sliding_window", None)
    return getattr(attention, "sliding_window", None)


def lean_unsupported(model: torch.nn.Module, total_len: int | None = None) -> str | None:
    """Why ``model`` cannot run on the lean decode path (a short reason), or None when it can.

    ``total_len``: prompt + completion length of the generation (padded); a sliding window must be at
    least that long (it is then plain causal attention), and without ``total_len`` any window is refused.
    Refused: classes outside ``FAMILIES`` (including peft wrappers and VL models), dtypes other than
    fp32/bf16/fp16, activations other than SiLU, rope types outside ``EXACT_ROPE_TYPES`` or partial rotary,
    logit soft-capping, layers with modules the lean path does not run, projections that are not plain
    ``nn.Linear`` (LoRA), parametrized modules, and any forward hook on any module (routing record or
    replay, accelerate offloading, adapters): a hook would silently not run on the lean path.
    """
    family = family_of(model)
    if family is None:
        return f"{type(model).__name__} is not one of {tuple(FAMILIES)}"
    config = model.config
    if config.model_type != family.model_type:
        return f"model_type {config.model_type!r} is not {family.model_type!r} for {family.class_name}"
    dtype = model.model.embed_tokens.weight.dtype
    if dtype not in SUPPORTED_DTYPES:
        return f"dtype {dtype} is not one of {SUPPORTED_DTYPES}"
    if config.hidden_act != "silu":
        return f"hidden_act {config.hidden_act!r} is not 'silu'"
    reason = _rope_unsupported(config)
    if reason is not None:
        return reason
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, name, None) is not None:
            return f"{name}={getattr(config, name)} is not applied by the lean path"
    if getattr(model.lm_head, "bias", None) is not None:
        return "the LM head has a bias"
    for index, layer in enumerate(model.model.layers):
        reason = _layer_unsupported(family, config, layer, total_len)
        if reason is not None:
            return f"layer {index}: {reason}"
    for name, module in model.named_modules():
        if module._forward_hooks or module._forward_pre_hooks:
            return f"module {name or type(model).__name__} has forward hooks (e.g. routing record/replay)"
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        return "global module forward hooks are registered"
    return None


def _rope_unsupported(config) -> str | None:
    rope = getattr(config, "rope_parameters", None) or {}
    if rope and "rope_type" not in rope and all(isinstance(value, dict) for value in rope.values()):
        return f"per-layer-type rope parameters {sorted(rope)} are not supported"
    rope_type = rope.get("rope_type", "default")
    if rope_type not in EXACT_ROPE_TYPES:
        return f"rope_type {rope_type!r} is not one of {EXACT_ROPE_TYPES} (dynamic/longrope depend on the length)"
    partial = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    if partial not in (None, 1.0):
        return f"partial_rotary_factor {partial} (RoPE on part of each head) is not supported"
    return None


def _layer_unsupported(family: Family, config, layer: torch.nn.Module, total_len: int | None) -> str | None:
    attention, mlp = layer.self_attn, layer.mlp
    expected = [(layer, LAYER_CHILDREN),
                (attention, ATTENTION_CHILDREN | ({"q_norm", "k_norm"} if family.qk_norm else set()))]
    moe = hasattr(mlp, "experts")
    if moe and not family.moe:
        return f"{family.class_name} with an MoE MLP {type(mlp).__name__}"
    expected.append((mlp, MOE_MLP_CHILDREN if moe else DENSE_MLP_CHILDREN))
    for module, names in expected:
        children = {name for name, _ in module.named_children()}
        if children != names:
            return f"{type(module).__name__} has modules {sorted(children)}, the lean path runs {sorted(names)}"
    if not isinstance(getattr(attention, "scaling", None), float):
        return f"attention {type(attention).__name__} has no float `scaling`"
    linears = [getattr(attention, name) for name in sorted(ATTENTION_CHILDREN)]
    linears += [getattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj") if not moe]
    for linear in linears:
        if type(linear) is not torch.nn.Linear:  # e.g. a LoRA-wrapped projection
            return f"a projection is a {type(linear).__module__}.{type(linear).__name__}, not a plain nn.Linear"
    if any(parametrize.is_parametrized(module) for module in layer.modules()):
        return "a parametrized module (e.g. LoRA on fused experts) would be read without its parametrization"
    if moe:
        experts = mlp.experts
        if not (isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor)
                and isinstance(getattr(experts, "down_proj", None), torch.Tensor)
                and getattr(experts, "gate_up_proj_bias", None) is None
                and all(hasattr(mlp.gate, name) for name in ("weight", "top_k", "norm_topk_prob"))):
            return f"MoE layout {type(experts).__name__} is not fused 3-D gate_up_proj/down_proj without bias"
    window = sliding_window(family, config, attention)
    if window is not None and (total_len is None or window < total_len):
        return f"sliding window {window} is shorter than the generation ({total_len} tokens)"
    return None
