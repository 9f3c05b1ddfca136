"""reasoning-gym generators (offline, ``pip install reasoning-gym``) as Examples.

``load_reasoning_gym("chain_sum", n=500, seed=0)`` -> the task's question / answer pairs,
deterministic in (task, n, seed, split, config). With ``split="train"`` or ``"test"`` only problems
whose question hashes to that side are kept (``heldout_split``), so the two never overlap even with
the same seed; ``split=None`` keeps the generator's first n problems.
"""

from __future__ import annotations

import logging

from sapo.data.example import Example, ExampleList, heldout_split

logger = logging.getLogger(__name__)


def load_reasoning_gym(task: str, n: int = 500, seed: int = 0, split: str | None = None,
                       heldout_fraction: float = 0.2, **config) -> ExampleList:
    try:
        import reasoning_gym
        from reasoning_gym.factory import DATASETS
    except ImportError as err:
        raise ImportError("reasoning_gym tasks need the reasoning-gym package: pip install reasoning-gym") from err
    if task not in DATASETS:
        raise ValueError(f"unknown reasoning_gym task {task!r}; available: {', '.join(sorted(DATASETS))}")
    if split not in (None, "train", "test"):
        raise ValueError(f"split must be None, 'train' or 'test', got {split!r}")
    fraction = 1.0 if split is None else heldout_fraction if split == "test" else 1.0 - heldout_fraction
    size = int(n / fraction * 1.3) + 16
    examples = ExampleList(source=f"reasoning_gym:{task}")
    for _ in range(4):  # grow the generated pool until the split has n problems
        examples.clear()
        dataset = reasoning_gym.create_dataset(task, size=size, seed=seed, **config)
        for entry in dataset:
            if split is not None and heldout_split(entry["question"], heldout_fraction) != split:
                continue
            examples.append(Example(
                prompt=entry["question"], answer=str(entry["answer"]),
                meta={"task": f"reasoning_gym:{task}", "split": split, "metadata": entry.get("metadata", {}),
                      "answer_format": "boxed"},
            ))
            if len(examples) >= n:
                return examples
        size *= 2
    logger.warning("reasoning_gym:%s gave only %d %s problems of the %d asked", task, len(examples), split, n)
    return examples
