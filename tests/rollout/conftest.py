"""Tiny random models built from a config (no hub) for the rollout tests."""

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

VOCAB = 64


def tiny_qwen3(seed: int = 0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, initializer_range=0.2,
        tie_word_embeddings=False,
    )
    return Qwen3ForCausalLM(config).float()


def tiny_qwen3_moe(seed: int = 0) -> Qwen3MoeForCausalLM:
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=False,
        experts_implementation="grouped_mm",
    )
    return Qwen3MoeForCausalLM(config).float()


@pytest.fixture(scope="module", params=["qwen3", "qwen3_moe"])
def model(request):
    return tiny_qwen3() if request.param == "qwen3" else tiny_qwen3_moe()


@pytest.fixture
def prompts():
    """Variable-length prompts (ids 1..VOCAB-1; 0 is the pad id)."""
    g = torch.Generator().manual_seed(1)
    lengths = [3, 7, 5, 1, 6]
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]
