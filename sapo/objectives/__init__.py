"""Layer 1: policy objectives as pure tensor math (SAPO, GRPO, DAPO, Dr.GRPO, GSPO, GSPO-token, CISPO)."""

from sapo.objectives.aggregation import aggregation_weights
from sapo.objectives.loss import policy_loss, token_loss
from sapo.objectives.metrics import metric_names
from sapo.objectives.presets import PRESETS, LossSpec, loss_types, resolve

__all__ = [
    "PRESETS",
    "LossSpec",
    "aggregation_weights",
    "loss_types",
    "metric_names",
    "policy_loss",
    "resolve",
    "token_loss",
]
