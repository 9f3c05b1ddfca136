"""Format reward: 1.0 when the completion states exactly one final answer in the expected form.

``marker="boxed"``: exactly one ``\\boxed{...}`` / ``\\fbox{...}`` command, balanced and non-empty.
``marker="####"``: exactly one ``####``, followed by a non-empty answer, on the last non-empty line.
The answer's correctness is not checked here (that is ``math_reward``).
"""

from __future__ import annotations

from collections.abc import Sequence

from sapo.rewards.extract import BOX_COMMANDS, find_boxed
from sapo.rewards.math_reward import completion_text

FORMAT_MARKERS = ("boxed", "####")


def has_single_answer(text: str, marker: str = "boxed") -> bool:
    if marker == "boxed":
        commands = sum(text.count(command + "{") + text.count(command + " ") for command in BOX_COMMANDS)
        boxed = find_boxed(text)
        return commands == 1 and len(boxed) == 1 and bool(boxed[0].strip())
    if marker == "####":
        if text.count("####") != 1:
            return False
        last_line = text.rstrip().rsplit("\n", 1)[-1]
        _, hashes, answer = last_line.partition("####")
        return bool(hashes) and bool(answer.strip())
    raise ValueError(f"format marker must be one of {FORMAT_MARKERS}, got {marker!r}")


def format_reward(prompts: Sequence, completions: Sequence, answers: Sequence,
                  marker: str = "boxed") -> list[float]:
    """1.0 per completion with exactly one final-answer marker of the ``marker`` kind, else 0.0."""
    if marker not in FORMAT_MARKERS:
        raise ValueError(f"format marker must be one of {FORMAT_MARKERS}, got {marker!r}")
    return [1.0 if has_single_answer(completion_text(c), marker) else 0.0 for c in completions]


def hash_format_reward(prompts: Sequence, completions: Sequence, answers: Sequence) -> list[float]:
    """``format_reward`` with the GSM8K / built-in task marker ``#### <answer>``."""
    return format_reward(prompts, completions, answers, marker="####")
