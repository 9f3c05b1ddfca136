"""Generation engines behind one interface (see ``sapo.rollout.base`` for the contract)."""

from __future__ import annotations

import torch

from sapo.rollout.base import RolloutBatch, RolloutEngine
from sapo.rollout.hf_engine import HFEngine
from sapo.rollout.sampling import filter_logits, sample_tokens
from sapo.rollout.torch_engine import TorchEngine

ENGINES = {"torch": TorchEngine, "hf": HFEngine}


def make_engine(name: str, model: torch.nn.Module, **options) -> RolloutEngine:
    """Build the engine called ``name`` ("torch", the default, or "hf") around the live model."""
    if name not in ENGINES:
        raise ValueError(f"unknown rollout engine {name!r}; choose one of {sorted(ENGINES)}")
    return ENGINES[name](model, **options)


__all__ = ["ENGINES", "HFEngine", "RolloutBatch", "RolloutEngine", "TorchEngine", "filter_logits",
           "make_engine", "sample_tokens"]
