"""Models: loading, tiny built-in configs, the character tokenizer, hidden-state forward, MoE routing, LoRA."""

from sapo.models.char_tokenizer import build_char_tokenizer
from sapo.models.forward import hidden_states, output_bias, output_weight
from sapo.models.loading import load_model, save_model
from sapo.models.lora import adapters_disabled, apply_lora, merge_lora
from sapo.models.routing import (
    expert_load_entropy,
    is_moe,
    moe_layers,
    pad_routing,
    record_routing,
    replay_mismatch_fraction,
    replay_routing,
    routing_changed_fraction,
    routing_unavailable,
)
from sapo.models.tiny import build_tiny_model, tiny_config

__all__ = [
    "adapters_disabled",
    "apply_lora",
    "build_char_tokenizer",
    "build_tiny_model",
    "expert_load_entropy",
    "hidden_states",
    "is_moe",
    "load_model",
    "merge_lora",
    "moe_layers",
    "output_bias",
    "output_weight",
    "pad_routing",
    "record_routing",
    "replay_mismatch_fraction",
    "replay_routing",
    "routing_changed_fraction",
    "routing_unavailable",
    "save_model",
    "tiny_config",
]
