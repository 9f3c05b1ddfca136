"""Named objectives as points on three axes (ratio level x shaping x aggregation) plus their constants.

`resolve(loss_type, **options)` starts from a registered objective and applies overrides, then validates
the result. The built-in objectives below are registered with the same `register_objective` call a user or
a plug-in uses (registry.py); what each one consumes comes from its axes' declarations (`LossSpec.consumes`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property

from sapo.objectives.axes import AGGREGATIONS, KL_ESTIMATORS, RATIO_LEVELS
from sapo.objectives.registry import (
    ALIASES,  # noqa: F401  (re-exported from its old home)
    PRESETS,  # noqa: F401  (re-exported from its old home)
    consumed_inputs,
    get_objective,
    get_shaping,
    objective_names,
    register_objective,
    register_shaping,
    shaping_names,
)

CISPO_CAP_MODES = ("absolute", "relative")


@dataclass(frozen=True)
class LossSpec:
    """Everything scalar that defines a policy objective (per-call tensors are passed to policy_loss)."""

    loss_type: str
    ratio_level: str  # one of RATIO_LEVELS
    shaping: str  # a registered shaping (shaping_names())
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

    # What the objective consumes, from its axes' declarations (registry.INPUTS); never from its name.
    @cached_property
    def consumes(self) -> frozenset[str]:
        return consumed_inputs(self)

    @property
    def needs_logprobs(self) -> bool:
        """The shaping, the ratio (sequence_token) or the KL term uses the token log-probs with gradient."""
        return "logprobs" in self.consumes

    @property
    def detached_ratio(self) -> bool:
        """The ratio is computed from detached log-probs (CISPO: the gradient flows through logp only)."""
        return "detached_ratio" in self.consumes

    @property
    def needs_max_completion_length(self) -> bool:
        return "max_completion_length" in self.consumes

    @property
    def needs_ref_logprobs(self) -> bool:
        return "ref_logprobs" in self.consumes

    @property
    def sequence_advantages(self) -> bool:
        """Advantages must be per sequence, [B] (a sequence ratio: one loss per sequence)."""
        return "sequence_advantages" in self.consumes

    @property
    def fusable(self) -> bool:
        """token_loss x aggregation_weights is the whole loss, so sapo.ops can fuse it with the lm_head:
        a per-token ratio and no KL term (which needs reference log-probs)."""
        return self.token_level and not self.needs_ref_logprobs


# TRL's option names -> ours.
OPTION_ALIASES = {"sapo_temperature_pos": "tau_pos", "sapo_temperature_neg": "tau_neg"}
_FIELDS = tuple(f.name for f in dataclasses.fields(LossSpec) if f.name != "loss_type")
OPTIONS = (*_FIELDS, "epsilon", *OPTION_ALIASES)


def loss_types() -> tuple[str, ...]:
    """Every loss_type: registered objectives, aliases and installed plug-ins (listed, not imported)."""
    return objective_names()


def resolve(loss_type: str = "sapo", **options) -> LossSpec:
    """The LossSpec of `loss_type` with `options` applied; raises ValueError on anything invalid.

    Options set to None count as not given. `epsilon` sets epsilon_low and epsilon_high unless those are
    given too. `sapo_temperature_pos/neg` are TRL's names for tau_pos/tau_neg.
    """
    objective = get_objective(loss_type)  # loads an installed plug-in the first time its name is asked for
    name = objective.name
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
    spec = LossSpec(loss_type=name, **{**objective.preset(), **given})
    validate(spec)
    return spec


def objective_options(loss_type: str, options: dict, *, max_completion_length: int | None = None) -> dict:
    """`options` plus the run-level values the objective declares it consumes: what a trainer passes to
    resolve / policy_loss. A value is added only when the resolved objective (options applied, e.g. an
    `aggregation` override) consumes it, and never over a value `options` already holds.

        objective_options("dr_grpo", {}, max_completion_length=48) == {"max_completion_length": 48}
        objective_options("sapo", {}, max_completion_length=48) == {}
    """
    run_values = {"max_completion_length": max_completion_length}  # INPUTS a run supplies by value
    supplied = {key: value for key, value in run_values.items() if value is not None and options.get(key) is None}
    spec = resolve(loss_type, **{**options, **supplied})
    return {**options, **{key: value for key, value in supplied.items() if key in spec.consumes}}


def _one_of(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; allowed: {', '.join(map(str, allowed))}")


def validate(spec: LossSpec) -> None:
    """Raise ValueError when a value or a combination of axes makes no sense."""
    _one_of("ratio_level", spec.ratio_level, RATIO_LEVELS)
    _one_of("shaping", spec.shaping, shaping_names())
    _one_of("aggregation", spec.aggregation, AGGREGATIONS)
    _one_of("kl_estimator", spec.kl_estimator, KL_ESTIMATORS)
    _one_of("cispo_cap_mode", spec.cispo_cap_mode, CISPO_CAP_MODES)
    for tau_name in ("tau_pos", "tau_neg"):
        if not getattr(spec, tau_name) > 0:
            raise ValueError(f"{tau_name} must be > 0, got {getattr(spec, tau_name)}")
    for eps_name in ("epsilon_low", "epsilon_high"):
        if not getattr(spec, eps_name) >= 0:
            raise ValueError(f"{eps_name} must be >= 0, got {getattr(spec, eps_name)}")
    shaping = get_shaping(spec.shaping)
    if shaping.check is not None:  # the shaping's own constraints on the constants it uses
        shaping.check(spec)
    if not spec.beta >= 0:
        raise ValueError(f"beta must be >= 0, got {spec.beta}")
    if not spec.log_ratio_clamp > 0:
        raise ValueError(f"log_ratio_clamp must be > 0, got {spec.log_ratio_clamp}")
    if spec.max_completion_length is not None and not (
        isinstance(spec.max_completion_length, int) and spec.max_completion_length > 0
    ):
        raise ValueError(f"max_completion_length must be a positive int, got {spec.max_completion_length!r}")
    if spec.needs_max_completion_length and spec.max_completion_length is None:
        if spec.aggregation == "seq_mean_token_sum_norm":
            why = "aggregation='seq_mean_token_sum_norm' (dr_grpo) divides by num_sequences * max_completion_length"
        else:
            why = f"shaping={spec.shaping!r} declares that it consumes max_completion_length"
        raise ValueError(f"{why}: pass max_completion_length (the configured generation limit, not the padded width)")
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
    if spec.ratio_level not in shaping.ratio_levels:
        kind = "token" if spec.ratio_level == "token" else "sequence"
        allowed = [name for name in shaping_names() if spec.ratio_level in get_shaping(name).ratio_levels]
        raise ValueError(
            f"shaping={spec.shaping!r} needs ratio_level={' or '.join(map(repr, shaping.ratio_levels))}, got "
            f"{spec.ratio_level!r}; allowed shapings for {kind} ratios: {', '.join(allowed)}"
        )


# The built-in shapings (their math in shaping.py, imported when a loss is first computed: this module stays
# free of torch) and their constraints on the constants they use.
def _check_clip(spec: LossSpec) -> None:
    if spec.epsilon_low > 1:
        raise ValueError(f"epsilon_low must be in [0, 1] for clipping (lower bound 1 - eps), got {spec.epsilon_low}")


def _check_cispo(spec: LossSpec) -> None:
    if spec.cispo_cap_mode == "absolute" and not spec.epsilon_high > 0:
        raise ValueError("cispo with cispo_cap_mode='absolute' needs epsilon_high > 0 (it is the cap on r)")


register_shaping("clip", "sapo.objectives.shaping:clip", check=_check_clip)
register_shaping("soft_gate", "sapo.objectives.shaping:soft_gate")
# CISPO weights each token's log-prob by its own (detached) ratio: per token only.
register_shaping("cispo", "sapo.objectives.shaping:cispo", consumes=("logprobs", "detached_ratio"),
                 ratio_levels=("token",), check=_check_cispo)
register_shaping("none", "sapo.objectives.shaping:unshaped")

# The built-in objectives, registered like any other (one call each; register_objective validates them with
# LossSpec and validate above). PRESETS (registry.py) is the read-only view name -> axes and defaults.
register_objective("sapo", ratio_level="token", shaping="soft_gate", aggregation="seq_mean_token_mean",
                   tau_pos=1.0, tau_neg=1.05)
register_objective("grpo", ratio_level="token", shaping="clip", aggregation="seq_mean_token_mean",
                   epsilon_low=0.2, epsilon_high=0.2)
register_objective("grpo_r2", ratio_level="token", shaping="clip", aggregation="seq_mean_token_mean",
                   epsilon_low=0.2, epsilon_high=0.27)
register_objective("dapo", ratio_level="token", shaping="clip", aggregation="token_mean",
                   epsilon_low=0.2, epsilon_high=0.28)
register_objective("dr_grpo", ratio_level="token", shaping="clip", aggregation="seq_mean_token_sum_norm",
                   epsilon_low=0.2, epsilon_high=0.2)
register_objective("gspo", ratio_level="sequence", shaping="clip", aggregation="seq_mean",
                   epsilon_low=3e-4, epsilon_high=4e-4)
register_objective("gspo_token", ratio_level="sequence_token", shaping="clip", aggregation="seq_mean_token_mean",
                   epsilon_low=3e-4, epsilon_high=4e-4)
register_objective("cispo", ratio_level="token", shaping="cispo", aggregation="token_mean", epsilon_high=5.0)
