"""Layer 1: policy objectives as pure tensor math (SAPO, GRPO, DAPO, Dr.GRPO, GSPO, GSPO-token, CISPO),
plus the registry that adds objectives in-tree, from user code, or from installed plug-ins (registry.py)."""

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

__all__ = [
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
