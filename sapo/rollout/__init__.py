"""Generation engines behind one interface (see ``sapo.rollout.base`` for the contract)."""

from __future__ import annotations

from sapo.rollout.base import CopiedWeights, LiveWeights, RolloutBatch, RolloutEngine, SamplingParams
from sapo.rollout.hf_engine import HFEngine
from sapo.rollout.registry import DEFAULT_ENGINE, ENGINES, engine_names, make_engine, register_engine
from sapo.rollout.sampling import filter_logits, sample_tokens
from sapo.rollout.torch_engine import OwnCopyTorchEngine, TorchEngine

__all__ = ["DEFAULT_ENGINE", "ENGINES", "CopiedWeights", "HFEngine", "LiveWeights", "OwnCopyTorchEngine",
           "RolloutBatch", "RolloutEngine", "SamplingParams", "TorchEngine", "engine_names", "filter_logits",
           "make_engine", "register_engine", "sample_tokens"]
