"""Layer 1: policy objectives as pure tensor math (SAPO, GRPO, DAPO, Dr.GRPO, GSPO, GSPO-token, CISPO),
plus the registry that adds objectives in-tree, from user code, or from installed plug-ins (registry.py).

Names are imported from their submodules on first access (PEP 562), so the registry can list and
validate objectives (`sapo train --help`, config validation) without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "aggregation_weights": "aggregation",
    "policy_loss": "loss",
    "token_loss": "loss",
    "metric_names": "metrics",
    "PRESETS": "presets",
    "LossSpec": "presets",
    "loss_types": "presets",
    "objective_options": "presets",
    "resolve": "presets",
    "ENTRY_POINT_GROUP": "registry",
    "INPUTS": "registry",
    "Objective": "registry",
    "Shaping": "registry",
    "get_objective": "registry",
    "objective_names": "registry",
    "register_objective": "registry",
    "register_shaping": "registry",
}
__all__ = [  # the keys of _EXPORTS
    "ENTRY_POINT_GROUP",
    "INPUTS",
    "PRESETS",
    "LossSpec",
    "Objective",
    "Shaping",
    "aggregation_weights",
    "get_objective",
    "loss_types",
    "metric_names",
    "objective_names",
    "objective_options",
    "policy_loss",
    "register_objective",
    "register_shaping",
    "resolve",
    "token_loss",
]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sapo.objectives' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"sapo.objectives.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:
    from sapo.objectives.aggregation import aggregation_weights
    from sapo.objectives.loss import policy_loss, token_loss
    from sapo.objectives.metrics import metric_names
    from sapo.objectives.presets import PRESETS, LossSpec, loss_types, objective_options, resolve
    from sapo.objectives.registry import (
        ENTRY_POINT_GROUP,
        INPUTS,
        Objective,
        Shaping,
        get_objective,
        objective_names,
        register_objective,
        register_shaping,
    )
