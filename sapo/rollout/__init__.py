"""Generation engines behind one interface (see ``sapo.rollout.base`` for the contract)."""

from __future__ import annotations

import torch

from sapo.rollout.base import RolloutBatch, RolloutEngine
from sapo.rollout.hf_engine import HFEngine
from sapo.rollout.sampling import filter_logits, sample_tokens
from sapo.rollout.torch_engine import TorchEngine

ENGINES = {"torch": TorchEngine, "hf": HFEngine}
DEFAULT_ENGINE = "torch"


def make_engine(name: str, model: torch.nn.Module, **options) -> RolloutEngine:
    """Build the engine called ``name`` around the live model: "torch" (``DEFAULT_ENGINE``) or "hf".

    ``options`` go to the engine's constructor (TorchEngine: ``cache="static"|"dynamic"``, ``compile``,
    ``lean`` (default True: the lean Qwen3 forward where supported)).
    """
    if name not in ENGINES:
        raise ValueError(f"unknown rollout engine {name!r}; choose one of {sorted(ENGINES)}")
    return ENGINES[name](model, **options)


__all__ = ["DEFAULT_ENGINE", "ENGINES", "HFEngine", "RolloutBatch", "RolloutEngine", "TorchEngine", "filter_logits",
           "make_engine", "sample_tokens"]
