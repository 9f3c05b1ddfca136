"""Models: loading, tiny built-in configs, the character tokenizer, hidden-state forward, MoE routing, LoRA."""

from sapo.models.char_tokenizer import build_char_tokenizer
from sapo.models.forward import hidden_states, output_bias, output_weight
from sapo.models.tiny import build_tiny_model, tiny_config

__all__ = [
    "build_char_tokenizer",
    "build_tiny_model",
    "hidden_states",
    "output_bias",
    "output_weight",
    "tiny_config",
]
