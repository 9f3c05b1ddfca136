"""Engines by name: `make_engine("torch", model)`; a new engine is one `register_engine` call.

A factory takes the trainer's model and keyword options and returns an object with the
``RolloutEngine`` interface (``sapo.rollout.base``). ``engine=NAME`` in a config accepts any
registered name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sapo.rollout.base import RolloutEngine
from sapo.rollout.hf_engine import HFEngine
from sapo.rollout.torch_engine import OwnCopyTorchEngine, TorchEngine

EngineFactory = Callable[..., RolloutEngine]
ENGINES: dict[str, EngineFactory] = {}
DEFAULT_ENGINE = "torch"


def register_engine(name: str, factory: EngineFactory, *, replace: bool = False) -> None:
    """Make `factory(model, **options)` available as engine `name`."""
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"engine name {name!r}: use letters, digits, '-' and '_'")
    if name in ENGINES and not replace:
        raise ValueError(f"an engine named {name!r} is already registered (pass replace=True to override it)")
    if not callable(factory):
        raise TypeError(f"engine {name!r}: the factory must be callable, got {type(factory).__name__}")
    ENGINES[name] = factory


def engine_names() -> tuple[str, ...]:
    return tuple(sorted(ENGINES))


def make_engine(name: str, model: torch.nn.Module, **options) -> RolloutEngine:
    """Build the engine called ``name`` around the trainer's model.

    Built in: "torch" (``DEFAULT_ENGINE``; options ``cache="static"|"dynamic"``, ``compile``, ``lean``),
    "torch-copy" (the same engine on its own copy of the weights, refreshed by ``load_weights``) and
    "hf" (HF ``generate``, the reference).
    """
    if name not in ENGINES:
        raise ValueError(f"unknown rollout engine {name!r}; choose one of {', '.join(engine_names())}")
    return ENGINES[name](model, **options)


register_engine("torch", TorchEngine)
register_engine("torch-copy", OwnCopyTorchEngine)
register_engine("hf", HFEngine)
