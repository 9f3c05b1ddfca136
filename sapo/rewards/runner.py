"""Weighted sum of reward functions that never crashes or hangs the training run.

A reward function is any callable ``(prompts, completions, answers) -> list[float]`` (one float per
completion), given as the callable itself, a built-in name (``"math"``, ``"format"``,
``"format_hash"``), ``"package.module:function"`` or ``"path/to/file.py:function"``.

``RewardRunner`` calls each function in a daemon thread and waits at most ``timeout_s``. A function
that raises, hangs, or returns something that is not one finite real number per completion gives
0.0 for that batch; the runner counts it (``reward/errors/NAME``, ``reward/timeouts/NAME``) and
logs a warning with the first traceback once per function. A hung thread cannot be killed: it is
left running in the background, and after ``max_hung_threads`` of them the function is no longer
called (every later batch counts as a timeout) so stuck threads cannot pile up.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import numbers
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sapo.rewards.format_reward import format_reward, hash_format_reward
from sapo.rewards.math_reward import math_reward

logger = logging.getLogger(__name__)

RewardFn = Callable[[Sequence, Sequence, Sequence], Sequence[float]]
BUILTIN_REWARDS: dict[str, RewardFn] = {
    "math": math_reward,
    "format": format_reward,
    "format_hash": hash_format_reward,
}


def load_reward_function(spec: str | RewardFn) -> RewardFn:
    """A reward callable from a callable, a built-in name, ``"module:function"`` or ``"file.py:function"``."""
    if callable(spec):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"a reward function is a callable or a string, got {type(spec).__name__}")
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward function {spec!r}: use a built-in name {sorted(BUILTIN_REWARDS)}, "
                         "'package.module:function' or 'path/to/file.py:function'")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise ValueError(f"reward function {spec!r}: file {path} does not exist")
        module_spec = importlib.util.spec_from_file_location(f"sapo_user_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ValueError(f"reward function {spec!r}: cannot import module {module_name!r} ({err}); "
                             "is it on PYTHONPATH?") from err
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
        raise ValueError(f"reward function {spec!r}: module {module_name!r} has no callable {attr!r}; "
                         f"callables there: {public}")
    return fn


def check_rewards(values, n: int) -> list[float]:
    """``values`` as a list of n finite floats, or ValueError saying what was wrong."""
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
        raise ValueError(f"returned {type(values).__name__}, expected a list of {n} floats")
    if hasattr(values, "tolist"):  # numpy array / torch tensor
        values = values.tolist()
    if len(values) != n:
        raise ValueError(f"returned {len(values)} values for {n} completions")
    out = []
    for i, v in enumerate(values):
        if not isinstance(v, numbers.Real):
            raise ValueError(f"value {i} is {type(v).__name__} {v!r}, expected a float")
        if not math.isfinite(float(v)):
            raise ValueError(f"value {i} is {float(v)}, expected a finite float")
        out.append(float(v))
    return out


@dataclass
class RewardOutput:
    total: list[float]  # weighted sum per completion
    columns: dict[str, list[float]]  # unweighted value of each function per completion, 0.0 where it failed
    metrics: dict[str, float] = field(default_factory=dict)  # cumulative counters and batch means


@dataclass
class _Entry:
    name: str
    fn: RewardFn
    weight: float
    errors: int = 0
    timeouts: int = 0
    warned: bool = False
    hung: list[threading.Thread] = field(default_factory=list)


class RewardError(RuntimeError):
    """Every reward function failed on too many batches: training would learn from all-zero rewards."""


class RewardRunner:
    def __init__(self, functions: Sequence[str | RewardFn], weights: Sequence[float] | None = None,
                 timeout_s: float = 120.0, max_hung_threads: int = 4, max_failed_batches: int | None = None):
        if not functions:
            raise ValueError("RewardRunner needs at least one reward function")
        weights = list(weights) if weights is not None else [1.0] * len(functions)
        if len(weights) != len(functions):
            raise ValueError(f"got {len(functions)} reward functions but {len(weights)} weights")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s}")
        self.timeout_s = timeout_s
        self.max_hung_threads = max_hung_threads
        # every function failed: the batch's rewards are all 0.0 and teach nothing. With max_failed_batches
        # set (the training loop's runner), RewardError stops rewards that never worked at their first
        # batch, and ones that worked before after max_failed_batches such batches in a row
        self.max_failed_batches = max_failed_batches
        self._failed_in_a_row, self._ever_succeeded = 0, False
        self.entries: list[_Entry] = []
        for spec, weight in zip(functions, weights):
            fn = load_reward_function(spec)
            name = spec if isinstance(spec, str) else getattr(fn, "__name__", type(fn).__name__)
            name = name.rpartition(":")[2] or name
            while any(e.name == name for e in self.entries):
                name += "_"
            self.entries.append(_Entry(name, fn, float(weight)))

    def _warn_once(self, entry: _Entry, message: str) -> None:
        if not entry.warned:
            entry.warned = True
            logger.warning("reward function %r: %s (further failures are only counted in "
                           "reward/errors/%s and reward/timeouts/%s)", entry.name, message, entry.name, entry.name)

    def _call(self, entry: _Entry, prompts, completions, answers) -> list[float] | None:
        entry.hung = [t for t in entry.hung if t.is_alive()]
        if len(entry.hung) >= self.max_hung_threads:
            entry.timeouts += 1
            self._warn_once(entry, f"{len(entry.hung)} earlier calls are still running; not called again")
            return None
        box: dict = {}

        def target():
            try:  # copies: a function that changes its input lists must not change the others' (or the loop's)
                box["value"] = entry.fn(list(prompts), list(completions), list(answers))
            except BaseException:
                box["error"] = traceback.format_exc()

        thread = threading.Thread(target=target, name=f"reward-{entry.name}", daemon=True)
        thread.start()
        thread.join(self.timeout_s)
        if thread.is_alive():
            entry.timeouts += 1
            entry.hung.append(thread)
            self._warn_once(entry, f"did not return within {self.timeout_s} s; its samples get 0.0")
            return None
        if "error" in box:
            entry.errors += 1
            self._warn_once(entry, f"raised; its samples get 0.0\n{box['error']}")
            return None
        try:
            return check_rewards(box.get("value"), len(completions))
        except ValueError as err:
            entry.errors += 1
            self._warn_once(entry, f"bad return value: {err}; its samples get 0.0")
            return None

    def __call__(self, prompts: Sequence, completions: Sequence, answers: Sequence) -> RewardOutput:
        n = len(completions)
        if len(prompts) != n or len(answers) != n:
            raise ValueError(f"rewards need one prompt and one answer per completion: got {len(prompts)} "
                             f"prompts, {n} completions, {len(answers)} answers")
        total = [0.0] * n
        columns: dict[str, list[float]] = {}
        metrics: dict[str, float] = {}
        failed = []
        for entry in self.entries:
            values = self._call(entry, prompts, completions, answers)
            if values is None:
                failed.append(entry.name)
            column = values if values is not None else [0.0] * n
            columns[entry.name] = column
            total = [t + entry.weight * v for t, v in zip(total, column)]
            metrics[f"reward/{entry.name}/mean"] = sum(column) / n if n else 0.0
        metrics.update(self.metrics())
        self._check_all_failed(failed)
        return RewardOutput(total, columns, metrics)

    def _check_all_failed(self, failed: list[str]) -> None:
        if self.max_failed_batches is None:
            return
        if len(failed) < len(self.entries):
            self._failed_in_a_row, self._ever_succeeded = 0, True
            return
        self._failed_in_a_row += 1
        if self._ever_succeeded and self._failed_in_a_row < self.max_failed_batches:
            return
        counts = ", ".join(f"{e.name}: {e.errors} errors, {e.timeouts} timeouts" for e in self.entries)
        when = (f"on {self._failed_in_a_row} batches in a row" if self._ever_succeeded
                else "on every batch so far")
        raise RewardError(f"every reward function failed {when} ({counts}; the first failure of each was logged "
                          "as a warning above): the rewards would all be 0.0. Fix the reward function(s) and "
                          "run again (or resume from the last checkpoint, if one was saved)")

    def metrics(self) -> dict[str, float]:
        out = {}
        for entry in self.entries:
            out[f"reward/errors/{entry.name}"] = float(entry.errors)
            out[f"reward/timeouts/{entry.name}"] = float(entry.timeouts)
            extra = getattr(entry.fn, "metrics", None)
            if callable(extra):
                out.update(extra())
        return out
