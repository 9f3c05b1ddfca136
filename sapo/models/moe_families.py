"""The Mixture-of-Experts router families sapo can record and replay, one registry entry each.

Routing replay forces the experts a token goes to and recomputes the gate weights *as the family's
own router would* for those experts, from the current router (so the router keeps its gradients and
an unchanged model reproduces its forward bit for bit). What differs between families is therefore
only (a) how the router's logits are computed, (b) how top-k weights follow from logits and the chosen
experts, and (c) which module consumes the chosen experts. A `GateRule` captures (a) and (b); a
`MoeFamily` names the router classes it covers, their rule and (c).

Layout every registered family shares (transformers 5.x): the router is a child of the MoE block,
is called once per forward on the block's tokens and returns `(router_logits [N, E], top-k weights
[N, k], top-k indices [N, k])`; the block then calls its fused experts module as
`experts(hidden [N, d], top-k indices [N, k], top-k weights [N, k])`.

To add a family: check its router's forward in `transformers/models/<family>/modeling_<family>.py`,
pick (or write) the GateRule that reproduces it exactly, add a `MoeFamily` to FAMILIES, and a tiny
config to `sapo.models.tiny_moe` so tests/models/test_moe_families.py covers it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class GateRule:
    """How one router family turns hidden states into logits, and logits + chosen experts into weights."""

    def logits(self, router: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Router logits [N, E], computed exactly as the router does (same dtype, same op)."""
        return F.linear(hidden.reshape(-1, router.weight.shape[1]), router.weight, getattr(router, "bias", None))

    def weights(self, router: nn.Module, logits: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Gate weights [N, k] the router would give `experts` [N, k] (long) had it chosen them."""
        raise NotImplementedError


@dataclass(frozen=True)
class SoftmaxTopK(GateRule):
    """p = softmax(logits) in float32, w = p[experts], renormalised over the k experts when the router's
    `norm_topk_prob` says so (`renormalise` when it has no such attribute); cast back to the logits'
    dtype unless `keep_float32` (Mixtral returns its float32 weights as they are)."""

    renormalise: bool = False
    keep_float32: bool = False

    def weights(self, router, logits, experts):
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)  # [N, E]
        weights = probs.gather(1, experts)  # [N, k]
        if getattr(router, "norm_topk_prob", self.renormalise):
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights if self.keep_float32 else weights.to(logits.dtype)


@dataclass(frozen=True)
class SigmoidGroupTopK(GateRule):
    """DeepSeek-V3 / GLM-4-MoE: logits in float32, s = sigmoid(logits). The router *chooses* by
    s + e_score_correction_bias within its top `topk_group` expert groups; the *weights* are s at the
    chosen experts (no bias), divided by their sum (+1e-20) when `norm_topk_prob`, times
    `routed_scaling_factor`. Weights stay float32."""

    def logits(self, router, hidden):
        return F.linear(hidden.reshape(-1, router.weight.shape[1]).float(), router.weight.float())

    def weights(self, router, logits, experts):
        weights = logits.sigmoid().gather(1, experts)  # [N, k]
        if router.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * router.routed_scaling_factor


@dataclass(frozen=True)
class TopKSoftmax(GateRule):
    """gpt-oss: logits with the router's bias, w = softmax over the k chosen logits (in their dtype)."""

    def weights(self, router, logits, experts):
        return F.softmax(logits.gather(1, experts), dim=1, dtype=logits.dtype)


@dataclass(frozen=True)
class MoeFamily:
    name: str  # as people call it, for messages and docs
    routers: tuple[str, ...]  # router class names (transformers 5.x)
    rule: GateRule
    experts: str = "experts"  # the block's module that consumes (hidden, top-k indices, top-k weights)
    no_replay: str | None = None  # why replay cannot force this router's choice (None: it can)


FAMILIES: tuple[MoeFamily, ...] = (
    MoeFamily("Qwen3-MoE", ("Qwen3MoeTopKRouter",), SoftmaxTopK()),
    MoeFamily("Qwen3-VL-MoE", ("Qwen3VLMoeTextTopKRouter",), SoftmaxTopK(renormalise=True)),
    MoeFamily("Qwen3.5-MoE", ("Qwen3_5MoeTopKRouter",), SoftmaxTopK(renormalise=True)),
    MoeFamily("Qwen3-Next", ("Qwen3NextTopKRouter",), SoftmaxTopK()),
    MoeFamily("Qwen2-MoE", ("Qwen2MoeTopKRouter",), SoftmaxTopK()),
    MoeFamily("OLMoE", ("OlmoeTopKRouter",), SoftmaxTopK()),
    MoeFamily("Mixtral", ("MixtralTopKRouter",), SoftmaxTopK(renormalise=True, keep_float32=True)),
    MoeFamily("DeepSeek-V3", ("DeepseekV3TopkRouter",), SigmoidGroupTopK()),
    MoeFamily("GLM-4-MoE", ("Glm4MoeTopkRouter",), SigmoidGroupTopK()),
    MoeFamily("gpt-oss", ("GptOssTopKRouter",), TopKSoftmax()),
    # routers identical to one above in transformers 5.24, each tested on its own tiny model
    MoeFamily("FlexOlmo", ("FlexOlmoTopKRouter",), SoftmaxTopK()),
    MoeFamily("MiniMax", ("MiniMaxTopKRouter",), SoftmaxTopK(renormalise=True, keep_float32=True)),
    MoeFamily("dots.llm1", ("Dots1TopkRouter",), SigmoidGroupTopK()),
    MoeFamily("GLM-4-MoE-Lite", ("Glm4MoeLiteTopkRouter",), SigmoidGroupTopK()),
)
_BY_ROUTER = {router: family for family in FAMILIES for router in family.routers}


def family_of(router: nn.Module) -> MoeFamily | None:
    """The registered family of a router module, None for an unknown router kind. A subclass of a
    registered router (e.g. torch's parametrization wrapper, when LoRA targets the router) counts."""
    return next((_BY_ROUTER[c.__name__] for c in type(router).__mro__ if c.__name__ in _BY_ROUTER), None)


def is_router_like(name: str, module: nn.Module) -> bool:
    """A module that looks like an MoE router: a registered router class, any class named *Router, or
    a non-Linear `mlp.gate` (unknown kinds still mark the model as MoE; they only cannot be replayed)."""
    class_name = type(module).__name__
    return (
        family_of(module) is not None
        or class_name.endswith("Router")
        or (name.endswith("mlp.gate") and not isinstance(module, nn.Linear))
    )


def config_declares_experts(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return any(
        isinstance(value := getattr(config, key, 0), int) and value > 1
        for key in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
    )
