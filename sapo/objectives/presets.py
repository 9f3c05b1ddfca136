"""Named objectives as points on three axes (ratio level x shaping x aggregation) plus their constants.

`resolve(loss_type, **options)` starts from a preset and applies overrides, then validates the result.
Adding an objective is one line in PRESETS (plus, for a new shaping, one function in shaping.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from sapo.objectives.aggregation import AGGREGATIONS
from sapo.objectives.kl import KL_ESTIMATORS
from sapo.objectives.ratios import RATIO_LEVELS
from sapo.objectives.shaping import SHAPINGS

CISPO_CAP_MODES = ("absolute", "relative")


@dataclass(frozen=True)
class LossSpec:
    """Everything scalar that defines a policy objective (per-call tensors are passed to policy_loss)."""

    loss_type: str
    ratio_level: str  # one of RATIO_LEVELS
    shaping: str  # one of SHAPINGS
    aggregation: str  # one of AGGREGATIONS
    tau_pos: float = 1.0  # SAPO gate temperature for A > 0
    tau_neg: float = 1.05  # SAPO gate temperature for A <= 0
    epsilon_low: float = 0.2  # clip: lower bound 1 - epsilon_low
    epsilon_high: float = 0.2  # clip: upper bound 1 + epsilon_high; cispo: the cap (see cispo_cap_mode)
    cispo_cap_mode: str = "absolute"  # "absolute": cap = epsilon_high (TRL); "relative": 1 + epsilon_high (verl)
    beta: float = 0.0  # KL coefficient; > 0 needs ref_logprobs
    kl_estimator: str = "k3"
    max_completion_length: int | None = None  # L_max for seq_mean_token_sum_norm (Dr.GRPO)
    log_ratio_clamp: float = 20.0  # |log r| bound before exp

    @property
    def token_level(self) -> bool:
        """True when the loss is per token and token_loss / aggregation_weights describe it fully."""
        return self.ratio_level == "token"


def _preset(ratio_level: str, shaping: str, aggregation: str, **constants) -> dict:
    return dict(ratio_level=ratio_level, shaping=shaping, aggregation=aggregation, **constants)


# name -> axes and defaults. One line per objective.
PRESETS: dict[str, dict] = {
    "sapo": _preset("token", "soft_gate", "seq_mean_token_mean", tau_pos=1.0, tau_neg=1.05),
    "grpo": _preset("token", "clip", "seq_mean_token_mean", epsilon_low=0.2, epsilon_high=0.2),
    "grpo_r2": _preset("token", "clip", "seq_mean_token_mean", epsilon_low=0.2, epsilon_high=0.27),
    "dapo": _preset("token", "clip", "token_mean", epsilon_low=0.2, epsilon_high=0.28),
    "dr_grpo": _preset("token", "clip", "seq_mean_token_sum_norm", epsilon_low=0.2, epsilon_high=0.2),
    "gspo": _preset("sequence", "clip", "seq_mean", epsilon_low=3e-4, epsilon_high=4e-4),
    "gspo_token": _preset("sequence_token", "clip", "seq_mean_token_mean", epsilon_low=3e-4, epsilon_high=4e-4),
    "cispo": _preset("token", "cispo", "token_mean", epsilon_high=5.0),
}
ALIASES = {"sapo_gated": "sapo"}

# TRL's option names -> ours.
OPTION_ALIASES = {"sapo_temperature_pos": "tau_pos", "sapo_temperature_neg": "tau_neg"}
_FIELDS = tuple(f.name for f in dataclasses.fields(LossSpec) if f.name != "loss_type")
OPTIONS = (*_FIELDS, "epsilon", *OPTION_ALIASES)


def loss_types() -> tuple[str, ...]:
    return (*PRESETS, *ALIASES)


def resolve(loss_type: str = "sapo", **options) -> LossSpec:
    """The LossSpec of `loss_type` with `options` applied; raises ValueError on anything invalid.

    Options set to None count as not given. `epsilon` sets epsilon_low and epsilon_high unless those are
    given too. `sapo_temperature_pos/neg` are TRL's names for tau_pos/tau_neg.
    """
    name = ALIASES.get(loss_type, loss_type)
    if name not in PRESETS:
        raise ValueError(f"unknown loss_type {loss_type!r}; allowed: {', '.join(loss_types())}")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for policy objectives; allowed: {', '.join(OPTIONS)}")
    given = {key: value for key, value in options.items() if value is not None}
    for alias, field in OPTION_ALIASES.items():
        if alias in given:
            value = given.pop(alias)
            if field in given and given[field] != value:
                raise ValueError(f"{alias}={value} contradicts {field}={given[field]}; pass only one")
            given[field] = value
    if "epsilon" in given:
        epsilon = given.pop("epsilon")
        given.setdefault("epsilon_low", epsilon)
        given.setdefault("epsilon_high", epsilon)
    if name == "cispo" and given.get("cispo_cap_mode") == "relative" and "epsilon_high" not in given:
        raise ValueError("cispo_cap_mode='relative' caps the weight at 1 + epsilon_high: pass epsilon_high explicitly")
    spec = LossSpec(loss_type=name, **{**PRESETS[name], **given})
    validate(spec)
    return spec


def _one_of(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; allowed: {', '.join(map(str, allowed))}")


def validate(spec: LossSpec) -> None:
    """Raise ValueError when a value or a combination of axes makes no sense."""
    _one_of("ratio_level", spec.ratio_level, RATIO_LEVELS)
    _one_of("shaping", spec.shaping, tuple(SHAPINGS))
    _one_of("aggregation", spec.aggregation, AGGREGATIONS)
    _one_of("kl_estimator", spec.kl_estimator, KL_ESTIMATORS)
    _one_of("cispo_cap_mode", spec.cispo_cap_mode, CISPO_CAP_MODES)
    for tau_name in ("tau_pos", "tau_neg"):
        if not getattr(spec, tau_name) > 0:
            raise ValueError(f"{tau_name} must be > 0, got {getattr(spec, tau_name)}")
    for eps_name in ("epsilon_low", "epsilon_high"):
        if not getattr(spec, eps_name) >= 0:
            raise ValueError(f"{eps_name} must be >= 0, got {getattr(spec, eps_name)}")
    if spec.shaping == "clip" and spec.epsilon_low > 1:
        raise ValueError(f"epsilon_low must be in [0, 1] for clipping (lower bound 1 - eps), got {spec.epsilon_low}")
    if spec.shaping == "cispo" and spec.cispo_cap_mode == "absolute" and not spec.epsilon_high > 0:
        raise ValueError("cispo with cispo_cap_mode='absolute' needs epsilon_high > 0 (it is the cap on r)")
    if not spec.beta >= 0:
        raise ValueError(f"beta must be >= 0, got {spec.beta}")
    if not spec.log_ratio_clamp > 0:
        raise ValueError(f"log_ratio_clamp must be > 0, got {spec.log_ratio_clamp}")
    if spec.max_completion_length is not None and not (
        isinstance(spec.max_completion_length, int) and spec.max_completion_length > 0
    ):
        raise ValueError(f"max_completion_length must be a positive int, got {spec.max_completion_length!r}")
    if spec.aggregation == "seq_mean_token_sum_norm" and spec.max_completion_length is None:
        raise ValueError(
            "aggregation='seq_mean_token_sum_norm' (dr_grpo) divides by num_sequences * max_completion_length: "
            "pass max_completion_length (the configured generation limit, not the padded width)"
        )
    if spec.ratio_level == "sequence" and spec.aggregation != "seq_mean":
        raise ValueError(
            f"ratio_level='sequence' gives one loss per sequence: aggregation must be 'seq_mean', "
            f"got {spec.aggregation!r} (a token aggregation would weight sequences by length)"
        )
    if spec.ratio_level != "sequence" and spec.aggregation == "seq_mean":
        raise ValueError(
            f"aggregation='seq_mean' needs ratio_level='sequence'; for ratio_level={spec.ratio_level!r} use one of "
            "seq_mean_token_mean, token_mean, seq_mean_token_sum_norm"
        )
    if spec.shaping == "cispo" and spec.ratio_level != "token":
        raise ValueError(
            f"shaping='cispo' weights each token's log-prob by its own ratio: it needs ratio_level='token', "
            f"got {spec.ratio_level!r}; allowed shapings for sequence ratios: clip, soft_gate, none"
        )
