"""The objective registry: every loss_type and every shaping, with what it consumes.

An objective is a point on three axes (ratio level x shaping x aggregation) plus default constants;
`register_objective` adds one (the built-in presets in presets.py are registered the same way), and
`register_shaping` adds a new way of turning the ratio into a loss. Each axis value declares the inputs it
consumes (INPUTS); `policy_loss`, `token_loss` and the trainer build the loss inputs from those
declarations (`LossSpec.consumes`), never from a name.

Installed packages add objectives through the entry-point group `sapo.objectives`:

    [project.entry-points."sapo.objectives"]
    gpg = "my_objectives:register"

The entry point's name is the loss_type; its object is a callable taking no arguments that registers (at
least) that loss_type with `register_objective`. It is imported and called only when that name is asked
for; listing the names (`objective_names`, `sapo train --help`) reads package metadata and imports nothing.

This module, presets.py (which registers the built-ins) and axes.py import no torch: the built-in shapings
are registered as "module:function" references, imported when a loss is first computed.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from sapo.objectives.axes import AGGREGATIONS, RATIO_LEVELS

if TYPE_CHECKING:
    import torch

    from sapo.objectives.presets import LossSpec

ENTRY_POINT_GROUP = "sapo.objectives"

# Every input an objective can consume beyond (ratio, advantages). policy_loss supplies exactly these.
INPUTS = {
    "logprobs": "token log-probs with gradient, passed to the shaping as `logprobs` ([B, T] float32, 0 at "
                "padding); without it the shaping gets None",
    "detached_ratio": "the ratio is built from detached log-probs: no gradient flows through it",
    "max_completion_length": "spec.max_completion_length, the configured generation limit (the trainer "
                             "supplies it: objective_options)",
    "ref_logprobs": "reference-model log-probs (the KL term; declared by beta > 0)",
    "sequence_advantages": "advantages per sequence, shape [B] (a sequence ratio)",
}
# What a shaping may declare; the other inputs belong to the ratio level, the aggregation or beta.
SHAPING_INPUTS = ("logprobs", "detached_ratio", "max_completion_length")
RATIO_LEVEL_INPUTS: dict[str, frozenset[str]] = {
    "token": frozenset(),
    "sequence": frozenset({"sequence_advantages"}),
    "sequence_token": frozenset({"logprobs"}),  # s_{i,t} = sg[s_i] * pi / sg[pi] needs logp with gradient
}
AGGREGATION_INPUTS: dict[str, frozenset[str]] = {
    "seq_mean_token_mean": frozenset(),
    "token_mean": frozenset(),
    "seq_mean_token_sum_norm": frozenset({"max_completion_length"}),  # Dr.GRPO divides by B * L_max
    "seq_mean": frozenset(),
}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*\Z")
_REFERENCE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*\Z")  # "package.module:function"

# shape(ratio, advantages, logprobs or None, spec) -> loss, elementwise (shaping.py)
ShapingFn = Callable[["torch.Tensor", "torch.Tensor", "torch.Tensor | None", "LossSpec"], "torch.Tensor"]


@dataclass(frozen=True)
class Shaping:
    """A registered shaping: the function (or a "module:function" reference to it) and what it consumes."""

    name: str
    target: ShapingFn | str
    consumes: frozenset[str]
    ratio_levels: tuple[str, ...]  # the ratio levels it is defined for
    check: Callable[[LossSpec], None] | None  # raises ValueError on constants that make no sense for it
    source: str  # who registered it, for error messages

    @cached_property
    def fn(self) -> ShapingFn:
        """The function; a "module:function" reference is imported the first time a loss needs it."""
        if callable(self.target):
            return self.target
        module, _, attr = self.target.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"shaping {self.name!r} (registered by {self.source}) refers to {self.target!r}, "
                             f"which cannot be imported: {type(err).__name__}: {err}") from err
        if not callable(fn):
            raise ValueError(f"shaping {self.name!r}: {self.target!r} is a {type(fn).__name__}, not a function")
        return fn


@dataclass(frozen=True)
class Objective:
    """A registered loss_type: its axes, its default constants, and who registered it."""

    name: str
    ratio_level: str
    shaping: str
    aggregation: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    source: str = "sapo"

    def preset(self) -> dict[str, Any]:
        """The LossSpec fields this objective sets (axes and defaults)."""
        return dict(ratio_level=self.ratio_level, shaping=self.shaping, aggregation=self.aggregation, **self.defaults)


_SHAPINGS: dict[str, Shaping] = {}
_OBJECTIVES: dict[str, Objective] = {}
ALIASES = {"sapo_gated": "sapo"}
_loading: list[str] = []  # the plug-in entry point being loaded (its registrations name it as their source)


def _builtins() -> None:
    """presets.py registers the built-in shapings and objectives when imported: every read of the tables
    goes through here, so the registry is complete whichever module was imported first."""
    import sapo.objectives.presets  # noqa: F401  (a sys.modules lookup after the first time)


def _caller_source(depth: int = 2) -> str:
    if _loading:
        return _loading[-1]
    return f"module {sys._getframe(depth).f_globals.get('__name__', '?')}"


def _check_name(kind: str, name) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{kind} name must be a non-empty identifier-like string (letters, digits, _ . -), "
                         f"got {name!r}")


def register_shaping(
    name: str,
    fn: ShapingFn | str,
    *,
    consumes: tuple[str, ...] | frozenset[str] = (),
    ratio_levels: tuple[str, ...] = RATIO_LEVELS,
    check: Callable[[LossSpec], None] | None = None,
) -> Shaping:
    """Add a shaping `fn(ratio, advantages, logprobs, spec) -> loss` (elementwise, float32, loss = -objective).

    fn: the function, or a "package.module:function" reference imported when a loss first needs it.
    consumes: any of SHAPING_INPUTS. "logprobs": fn gets the token log-probs with gradient (else None);
        "detached_ratio": the ratio carries no gradient; "max_completion_length": resolve() requires it
        and the trainer supplies it in spec.max_completion_length.
    ratio_levels: the ratio levels fn is defined for (a shaping that consumes logprobs works per token only).
    check: optional fn(spec) raising ValueError for constants that make no sense with this shaping.
    """
    _check_name("shaping", name)
    _builtins()
    if name in _SHAPINGS:
        raise ValueError(f"shaping {name!r} is already registered (by {_SHAPINGS[name].source}); choose another name")
    if not (callable(fn) or isinstance(fn, str) and _REFERENCE.match(fn)):
        raise ValueError(f"shaping {name!r}: fn must be callable (ratio, advantages, logprobs, spec) -> loss, "
                         f"or a 'package.module:function' reference, got {fn!r}")
    consumes = frozenset((consumes,) if isinstance(consumes, str) else consumes)
    unknown = sorted(consumes - set(SHAPING_INPUTS))
    if unknown:
        raise ValueError(f"shaping {name!r}: unknown input(s) {unknown} in consumes; a shaping may consume "
                         f"{', '.join(SHAPING_INPUTS)}")
    ratio_levels = (ratio_levels,) if isinstance(ratio_levels, str) else tuple(ratio_levels)
    bad_levels = [level for level in ratio_levels if level not in RATIO_LEVELS]
    if bad_levels or not ratio_levels:
        raise ValueError(f"shaping {name!r}: ratio_levels {list(ratio_levels)} must be a non-empty subset of "
                         f"{', '.join(RATIO_LEVELS)}")
    if "logprobs" in consumes and "sequence" in ratio_levels:
        raise ValueError(f"shaping {name!r} consumes per-token logprobs, which a sequence ratio (one loss per "
                         "sequence) cannot supply: leave 'sequence' out of ratio_levels")
    if check is not None and not callable(check):
        raise ValueError(f"shaping {name!r}: check must be callable(spec) or None")
    shaping = Shaping(name, fn, consumes, ratio_levels, check, _caller_source())
    _SHAPINGS[name] = shaping
    return shaping


def register_objective(name: str, *, ratio_level: str, shaping: str, aggregation: str, **defaults) -> Objective:
    """Add loss_type `name`: its three axes plus default values of any other LossSpec field
    (tau_pos, epsilon_low, epsilon_high, beta, ...). Validated now: the name must be new, the axes known and
    compatible, the defaults real LossSpec fields with valid values. Returns the registered Objective.

        register_objective("grpo_ch", ratio_level="token", shaping="clip", aggregation="token_mean",
                           epsilon_low=0.2, epsilon_high=0.4)
    """
    from sapo.objectives.presets import LossSpec, validate  # presets.py registers the built-ins through here

    _check_name("objective", name)
    _builtins()
    if name in _OBJECTIVES or name in ALIASES:
        existing = _OBJECTIVES[ALIASES.get(name, name)].source
        raise ValueError(f"loss_type {name!r} is already registered (by {existing}); choose another name")
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"objective {name!r}: unknown ratio_level {ratio_level!r}; allowed: {', '.join(RATIO_LEVELS)}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"objective {name!r}: unknown aggregation {aggregation!r}; allowed: {', '.join(AGGREGATIONS)}")
    if shaping not in _SHAPINGS:
        raise ValueError(f"objective {name!r}: unknown shaping {shaping!r}; registered: {', '.join(_SHAPINGS)} "
                         "(register a new one first with register_shaping)")
    axes = ("loss_type", "ratio_level", "shaping", "aggregation")
    fields = [f for f in LossSpec.__dataclass_fields__ if f not in axes]
    unknown = sorted(set(defaults) - set(fields))
    if unknown:
        raise ValueError(f"objective {name!r}: unknown default(s) {unknown}; allowed: {', '.join(fields)}")
    objective = Objective(name, ratio_level, shaping, aggregation, dict(defaults), _caller_source())
    probe = objective.preset()
    if "max_completion_length" in _consumes(ratio_level, shaping, aggregation) and probe.get("max_completion_length") is None:
        probe["max_completion_length"] = 1  # supplied per run (objective_options); any valid value checks the rest
    try:
        validate(LossSpec(loss_type=name, **probe))
    except (ValueError, TypeError) as err:  # TypeError: a default of the wrong type (tau_pos="1")
        raise ValueError(f"objective {name!r}: {err}") from None
    _OBJECTIVES[name] = objective
    return objective


def _consumes(ratio_level: str, shaping: str, aggregation: str) -> frozenset[str]:
    return RATIO_LEVEL_INPUTS[ratio_level] | _SHAPINGS[shaping].consumes | AGGREGATION_INPUTS[aggregation]


def consumed_inputs(spec: LossSpec) -> frozenset[str]:
    """The inputs (INPUTS keys) the objective of `spec` consumes: its axes' declarations, plus the KL term's."""
    kl = frozenset({"ref_logprobs", "logprobs"}) if spec.beta > 0 else frozenset()
    return _consumes(spec.ratio_level, spec.shaping, spec.aggregation) | kl


def get_shaping(name: str) -> Shaping:
    _builtins()
    try:
        return _SHAPINGS[name]
    except KeyError:
        raise ValueError(f"unknown shaping {name!r}; allowed: {', '.join(_SHAPINGS)}") from None


def shaping_names() -> tuple[str, ...]:
    _builtins()
    return tuple(_SHAPINGS)


# -- plug-ins ------------------------------------------------------------------------------------
def _entry_points() -> dict[str, list[importlib.metadata.EntryPoint]]:
    """Installed `sapo.objectives` entry points by name (package metadata only: nothing is imported)."""
    found: dict[str, list[importlib.metadata.EntryPoint]] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if not any(ep.value == other.value for other in found.get(ep.name, [])):  # a dist seen twice on sys.path
            found.setdefault(ep.name, []).append(ep)
    return found


def _describe(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    package = f"package {dist.name!r}" if dist is not None else "an installed package"
    return f"{package} (entry point {ep.name} = {ep.value!r} in group {ENTRY_POINT_GROUP!r})"


def _load_plugin(name: str, ep: importlib.metadata.EntryPoint) -> None:
    where = _describe(ep)
    _loading.append(f"plug-in {where}")
    try:
        register = ep.load()
        if not callable(register):
            raise ValueError(f"the entry point's object is a {type(register).__name__}, not a callable that registers")
        register()
    except Exception as err:
        raise ValueError(f"loss_type {name!r} comes from {where}, which failed to load: "
                         f"{type(err).__name__}: {err}") from err
    finally:
        _loading.pop()
    if name not in _OBJECTIVES:
        raise ValueError(f"loss_type {name!r} comes from {where}: its register() ran but registered no objective "
                         f"named {name!r} (it must call sapo.objectives.register_objective({name!r}, ...))")


def objective_names() -> tuple[str, ...]:
    """Every loss_type: registered objectives, aliases, then installed plug-ins not loaded yet (not imported)."""
    _builtins()
    plugins = [name for name in _entry_points() if name not in _OBJECTIVES and name not in ALIASES]
    return (*_OBJECTIVES, *ALIASES, *plugins)


def get_objective(loss_type: str) -> Objective:
    """The Objective of `loss_type` (an alias, a registered name, or an installed plug-in, loaded now)."""
    _builtins()
    name = ALIASES.get(loss_type, loss_type)
    if name in _OBJECTIVES:
        return _OBJECTIVES[name]
    if isinstance(name, str):
        candidates = _entry_points().get(name, [])
        if len(candidates) > 1:
            raise ValueError(f"loss_type {name!r} is provided by several installed packages: "
                             f"{'; '.join(sorted(_describe(ep) for ep in candidates))}; uninstall all but one")
        if candidates:
            _load_plugin(name, candidates[0])
            return _OBJECTIVES[name]
    raise ValueError(f"unknown loss_type {loss_type!r}; allowed: {', '.join(objective_names())} "
                     f"(add one with sapo.objectives.register_objective or an installed plug-in: docs/objectives.md)")


class _PresetView(Mapping):
    """name -> preset dict (axes and defaults) of every registered objective; read-only, always current."""

    def __getitem__(self, name: str) -> dict[str, Any]:
        _builtins()
        return _OBJECTIVES[name].preset()

    def __iter__(self) -> Iterator[str]:
        _builtins()
        return iter(list(_OBJECTIVES))

    def __len__(self) -> int:
        _builtins()
        return len(_OBJECTIVES)

    def __repr__(self) -> str:
        return f"PRESETS({', '.join(_OBJECTIVES)})"


PRESETS: Mapping[str, dict[str, Any]] = _PresetView()
