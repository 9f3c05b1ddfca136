"""Rollouts recorded by one run and replayed by another, so two runs train on identical completions.

A data-parallel run samples with per-rank generators, so 1 and 2 processes draw different
completions; the equality tests feed both the completions one process drew. Each prompt appears
once per epoch, so a prompt's token ids identify its group of completions.
"""

from __future__ import annotations

import json
from pathlib import Path

from sapo.rollout import LiveWeights, RolloutBatch, make_engine


class RecordingEngine(LiveWeights):
    """The real engine; every completion it returns is kept under its prompt."""

    def __init__(self, model, kind: str = "torch"):
        self.engine = make_engine(kind, model)
        self.records: dict[str, list] = {}

    def generate(self, prompt_ids, sampling, *, extra_inputs=None) -> RolloutBatch:
        batch = self.engine.generate(prompt_ids, sampling, extra_inputs=extra_inputs)
        for prompt, ids, logps, cut in zip(batch.prompt_ids, batch.completion_ids, batch.sampler_logprobs,
                                           batch.truncated):
            self.records.setdefault(json.dumps(prompt), []).append([ids, logps, cut])
        return batch

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.records))


class ReplayEngine(LiveWeights):
    """Returns the recorded completions of each prompt, in the order they were drawn."""

    def __init__(self, path: Path):
        self.records = json.loads(Path(path).read_text())

    def generate(self, prompt_ids, sampling, *, extra_inputs=None) -> RolloutBatch:
        taken: dict[str, int] = {}
        rows = []
        for prompt in prompt_ids:
            key = json.dumps(list(prompt))
            j = taken.get(key, 0)
            taken[key] = j + 1
            rows.append(self.records[key][j])
        return RolloutBatch([list(p) for p in prompt_ids], [r[0] for r in rows], [r[1] for r in rows],
                            [r[2] for r in rows])
