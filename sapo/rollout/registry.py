"""Engines by name: `make_engine("torch", model)`; a new engine is one `register_engine` call.

A factory takes the trainer's model and keyword options and returns an object with the
``RolloutEngine`` interface (``sapo.rollout.base``). ``engine=NAME`` in a config accepts any
registered name. Built-in engines are registered as "module:attribute" references, imported when
built, so listing names (config validation, ``--help``) imports neither torch nor transformers.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sapo.rollout.base import RolloutEngine

EngineFactory = Callable[..., "RolloutEngine"]
ENGINES: dict[str, EngineFactory | str] = {}
DEFAULT_ENGINE = "torch"


def register_engine(name: str, factory: EngineFactory | str, *, replace: bool = False) -> None:
    """Make `factory(model, **options)` available as engine `name` (a callable, or a
    "package.module:attribute" reference imported when the engine is first built)."""
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"engine name {name!r}: use letters, digits, '-' and '_'")
    if name in ENGINES and not replace:
        raise ValueError(f"an engine named {name!r} is already registered (pass replace=True to override it)")
    if isinstance(factory, str):
        if factory.count(":") != 1:
            raise ValueError(f"engine {name!r}: a reference must read 'package.module:attribute', got {factory!r}")
    elif not callable(factory):
        raise TypeError(f"engine {name!r}: the factory must be callable, got {type(factory).__name__}")
    ENGINES[name] = factory


def engine_names() -> tuple[str, ...]:
    return tuple(sorted(ENGINES))


def _factory(name: str) -> EngineFactory:
    factory: Any = ENGINES[name]
    if isinstance(factory, str):
        module, attribute = factory.split(":")
        factory = getattr(importlib.import_module(module), attribute)
        ENGINES[name] = factory
    return factory


def make_engine(name: str, model, **options) -> RolloutEngine:
    """Build the engine called ``name`` around the trainer's model.

    Built in: "torch" (``DEFAULT_ENGINE``; options ``cache="static"|"dynamic"``, ``compile``, ``lean``),
    "torch-copy" (the same engine on its own copy of the weights, refreshed by ``load_weights``) and
    "hf" (HF ``generate``, the reference).
    """
    if name not in ENGINES:
        raise ValueError(f"unknown rollout engine {name!r}; choose one of {', '.join(engine_names())}")
    return _factory(name)(model, **options)


register_engine("torch", "sapo.rollout.torch_engine:TorchEngine")
register_engine("torch-copy", "sapo.rollout.torch_engine:OwnCopyTorchEngine")
register_engine("hf", "sapo.rollout.hf_engine:HFEngine")
