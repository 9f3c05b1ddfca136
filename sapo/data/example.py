"""One training / evaluation problem, whatever file or generator it came from."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Example:
    """``prompt``: the question text, or a chat message list ``[{"role": ..., "content": ...}]``.
    ``answer``: the gold final answer as a string (graded by ``sapo.rewards.math_reward``).
    ``images``: image paths or objects for vision-language prompts (empty for text).
    ``meta``: everything else (source file and line, id, worked solution, ``answer_format``
    ("boxed" or "####") and ``instruction`` read by ``sapo.data.templates.build_prompt``)."""

    prompt: str | list[dict[str, Any]]
    answer: str
    images: list = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


class ExampleList(list):
    """A list of Examples that also says where they came from and which rows were skipped."""

    def __init__(self, examples=(), source: str = "", skipped: dict[str, int] | None = None):
        super().__init__(examples)
        self.source = source
        self.skipped: dict[str, int] = dict(skipped or {})  # reason -> count (on_error="skip")

    def summary(self) -> str:
        text = f"{len(self)} examples from {self.source}"
        if self.skipped:
            reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(self.skipped.items()))
            text += f" (skipped {sum(self.skipped.values())}: {reasons})"
        return text


def heldout_split(problem: str, heldout_fraction: float = 0.2) -> str:
    """"test" or "train", fixed by a hash of the problem text: the same problem is always on the
    same side, whatever the seed or the generation order, so the two splits never overlap."""
    bucket = int.from_bytes(hashlib.sha256(problem.encode()).digest()[:8], "big") % 1_000_000
    return "test" if bucket < heldout_fraction * 1_000_000 else "train"
