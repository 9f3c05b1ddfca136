"""Reward functions used by the reliability tests through `sapo train rewards=[...]`.

Imported in the training subprocess as `tests.reliability.user_rewards:NAME` (the repository root
is the subprocess's working directory). Each one is deterministic given the completions.
"""

from __future__ import annotations

import os
import time

_calls = {"n": 0}


def length_reward(prompts, completions, answers):
    """Varied, deterministic rewards (so advantages and gradients are non-zero)."""
    delay = float(os.environ.get("SAPO_TEST_REWARD_SLEEP", "0"))
    if delay:
        time.sleep(delay)  # slows steps down so a test can send a signal mid-run
    return [(len(c) % 5) / 4.0 for c in completions]


def constant_reward(prompts, completions, answers):
    """Every completion gets 1.0: every group has all-equal rewards."""
    return [1.0] * len(completions)


def raising_reward(prompts, completions, answers):
    raise RuntimeError("user reward exploded on purpose")


def hanging_reward(prompts, completions, answers):
    time.sleep(3600)  # never returns within reward_timeout
    return [0.0] * len(completions)


def huge_reward(prompts, completions, answers):
    """+-3e38 on the calls listed in SAPO_TEST_HUGE_CALLS (1-based, or "all"), else length_reward.

    With scale_rewards=none these advantages make the loss overflow float32: a real non-finite
    update, not a mocked one.
    """
    _calls["n"] += 1
    which = os.environ.get("SAPO_TEST_HUGE_CALLS", "")
    if which == "all" or str(_calls["n"]) in which.split(","):
        return [3e38 if i % 2 == 0 else -3e38 for i in range(len(completions))]
    return length_reward(prompts, completions, answers)
