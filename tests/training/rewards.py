"""Reward functions for tests: they vary within every group, so every step carries a gradient."""


def shorter_is_better(prompts, completions, answers):
    return [-len(c) / 50.0 for c in completions]


def always_raises(prompts, completions, answers):
    raise RuntimeError("this reward function is broken on purpose")
