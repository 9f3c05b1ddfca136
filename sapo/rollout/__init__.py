"""Generation engines behind one interface (see ``sapo.rollout.base`` for the contract).

Names are imported from their submodules on first access (PEP 562), so the engine registry can list
and validate names (config validation) without importing torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "CopiedWeights": "base", "LiveWeights": "base", "RolloutBatch": "base", "RolloutEngine": "base",
    "SamplingParams": "base", "HFEngine": "hf_engine", "DEFAULT_ENGINE": "registry", "ENGINES": "registry",
    "engine_names": "registry", "make_engine": "registry", "register_engine": "registry",
    "filter_logits": "sampling", "sample_tokens": "sampling", "OwnCopyTorchEngine": "torch_engine",
    "TorchEngine": "torch_engine",
}
__all__ = [  # the keys of _EXPORTS
    "DEFAULT_ENGINE", "ENGINES", "CopiedWeights", "HFEngine", "LiveWeights", "OwnCopyTorchEngine", "RolloutBatch",
    "RolloutEngine", "SamplingParams", "TorchEngine", "engine_names", "filter_logits", "make_engine",
    "register_engine", "sample_tokens",
]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sapo.rollout' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"sapo.rollout.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from sapo.rollout.base import CopiedWeights, LiveWeights, RolloutBatch, RolloutEngine, SamplingParams
    from sapo.rollout.hf_engine import HFEngine
    from sapo.rollout.registry import DEFAULT_ENGINE, ENGINES, engine_names, make_engine, register_engine
    from sapo.rollout.sampling import filter_logits, sample_tokens
    from sapo.rollout.torch_engine import OwnCopyTorchEngine, TorchEngine
