"""Verifiable math reward: 1.0 when the completion's final answer equals the gold answer, else 0.0.

Per sample: extract the final answer (``extract_answer``), reject pathological answers (too long,
too deeply nested), try the exact fast path (``fast_compare``), and only when that is undecided
ask math-verify in a worker process with a hard timeout (``VerifyPool``). A timed-out or crashed
comparison scores 0 and is counted in ``metrics()``.
"""

from __future__ import annotations

import atexit
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence

from sapo.rewards.extract import extract_answer, extract_hash_answer, find_boxed
from sapo.rewards.normalize import fast_compare
from sapo.rewards.verify_pool import VerifyPool

MAX_ANSWER_CHARS = 300  # longer extracted answers are not graded (they are never a final answer)
MAX_BRACE_DEPTH = 24  # deeper LaTeX nesting is rejected before it reaches the sympy parser


def completion_text(completion) -> str:
    """A completion as text: a string, or a chat message list whose last message's content is used."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content", "")
        return content if isinstance(content, str) else ""
    return ""


def gold_answer_text(answer) -> str:
    """The gold answer as a string; a full reference solution (``\\boxed`` / ``####``) is reduced to its answer."""
    if isinstance(answer, float) and answer.is_integer():
        return str(int(answer))
    text = str(answer).strip()
    boxed = find_boxed(text) if "\\boxed" in text or "\\fbox" in text else []
    if boxed:
        return boxed[-1].strip()
    if "####" in text:
        return extract_hash_answer(text) or text
    return text


def brace_depth(text: str) -> int:
    depth = deepest = 0
    for ch in text:
        if ch == "{" or ch == "(" or ch == "[":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == "}" or ch == ")" or ch == "]":
            depth = max(0, depth - 1)
    return deepest


def _default_workers() -> int:
    return max(1, min(4, (os.cpu_count() or 2) // 2))


class MathReward:
    """Callable reward ``(prompts, completions, answers) -> list[float]`` with its own worker pool."""

    def __init__(self, timeout_s: float = 5.0, num_workers: int | None = None, use_math_verify: bool = True,
                 use_fast_path: bool = True, cache_size: int = 65536, start_method: str | None = None):
        self.use_math_verify = use_math_verify
        self.use_fast_path = use_fast_path
        self.cache_size = cache_size
        self.pool = VerifyPool(num_workers or _default_workers(), timeout_s, start_method=start_method)
        self._cache: OrderedDict[tuple[str, str], bool] = OrderedDict()
        self._lock = threading.Lock()
        self.counters = {"graded": 0, "no_answer": 0, "rejected": 0, "fast_path": 0, "math_verify": 0,
                         "cache_hits": 0}
        self.__name__ = "math_reward"

    def __call__(self, prompts: Sequence, completions: Sequence, answers: Sequence) -> list[float]:
        if len(completions) != len(answers):
            raise ValueError(f"math_reward got {len(completions)} completions but {len(answers)} answers; "
                             "pass one gold answer per completion")
        preds = [extract_answer(completion_text(c)) for c in completions]
        return self.grade(answers, preds)

    def grade(self, golds: Sequence, preds: Sequence[str | None]) -> list[float]:
        """1.0 / 0.0 per (gold answer, already-extracted predicted answer) pair."""
        rewards = [0.0] * len(preds)
        slow: list[tuple[int, tuple[str, str]]] = []
        with self._lock:
            self.counters["graded"] += len(preds)
            for i, (gold, pred) in enumerate(zip(golds, preds)):
                if pred is None:
                    self.counters["no_answer"] += 1
                    continue
                gold = gold_answer_text(gold)
                if len(pred) > MAX_ANSWER_CHARS or brace_depth(pred) > MAX_BRACE_DEPTH:
                    self.counters["rejected"] += 1
                    continue
                if self.use_fast_path:
                    decided = fast_compare(gold, pred)
                    if decided is not None:
                        self.counters["fast_path"] += 1
                        rewards[i] = float(decided)
                        continue
                key = (gold, pred)
                if key in self._cache:
                    self.counters["cache_hits"] += 1
                    self._cache.move_to_end(key)
                    rewards[i] = float(self._cache[key])
                elif self.use_math_verify:
                    slow.append((i, key))
        if slow:
            unique = list(dict.fromkeys(key for _, key in slow))
            verdicts = dict(zip(unique, self.pool.verify_many(unique)))
            with self._lock:
                self.counters["math_verify"] += len(unique)
                for key, ok in verdicts.items():
                    if ok is not None:  # a timeout is not cached: it may pass on a less loaded machine
                        self._cache[key] = ok
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            for i, key in slow:
                rewards[i] = 1.0 if verdicts[key] else 0.0
        return rewards

    def equivalent(self, gold: str, pred: str) -> bool:
        return self.grade([gold], [pred])[0] == 1.0

    def metrics(self) -> dict[str, float]:
        """Cumulative counts, for logging under ``math/...``."""
        out = {f"math/{k}": float(v) for k, v in self.counters.items()}
        out.update({f"math/verify_{k}": float(v) for k, v in self.pool.counters.items()})
        return out

    def close(self) -> None:
        self.pool.close()


_default: MathReward | None = None
_default_lock = threading.Lock()


def configure_math_reward(**kwargs) -> MathReward:
    """Replace the instance behind ``math_reward`` (e.g. ``timeout_s=10, num_workers=4``)."""
    global _default
    with _default_lock:
        if _default is not None:
            _default.close()
        _default = MathReward(**kwargs)
        return _default


def default_math_reward() -> MathReward:
    global _default
    with _default_lock:
        if _default is None:
            _default = MathReward()
        return _default


def math_reward(prompts: Sequence, completions: Sequence, answers: Sequence) -> list[float]:
    """1.0 if the completion's final answer is mathematically equivalent to the gold answer, else 0.0."""
    return default_math_reward()(prompts, completions, answers)


def answers_equivalent(gold: str, pred: str) -> bool:
    """Whether an already-extracted answer ``pred`` equals ``gold`` (fast path, then math-verify)."""
    return default_math_reward().equivalent(gold, pred)


@atexit.register
def _close_default() -> None:
    if _default is not None:
        _default.close()


def _default_metrics() -> dict[str, float]:
    return default_math_reward().metrics()


math_reward.metrics = _default_metrics  # RewardRunner logs these counters next to its own
