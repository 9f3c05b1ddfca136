"""What a run is at the end of a step: `TrainerState`, exactly what a checkpoint's trainer_state.json
holds (the weights, optimizer, scheduler and RNG streams are saved beside it), and the data order."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np


@dataclass
class TrainerState:
    step: int = 0  # RL steps done (one rollout batch each)
    data_epoch: int = 0  # the prompt order's position: epoch ...
    data_index: int = 0  # ... and index inside its permutation
    nonfinite_total: int = 0  # updates skipped for a non-finite loss or gradient, since the run began
    nonfinite_run: int = 0  # ... of them in a row, up to now
    reward_counters: dict[str, float] = field(default_factory=dict)  # reward errors / timeouts since the run began
    best_eval: float | None = None  # best eval/pass@1 so far
    max_steps: int = 0  # the run's max_steps when saved
    world_size: int = 1  # processes that trained it
    policy_version: int = 0  # the optimizer step of the weights the rollout engine holds

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> TrainerState:
        """From trainer_state.json; also reads the layout before this dataclass ("data": {epoch, index})."""
        saved = dict(saved)
        data = saved.pop("data", None)
        if data is not None:
            saved.setdefault("data_epoch", data.get("epoch", 0))
            saved.setdefault("data_index", data.get("index", 0))
            saved.setdefault("policy_version", saved.get("step", 0))
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(saved) - names)
        if unknown:
            raise ValueError(f"trainer_state.json has unknown fields {unknown}: was it written by a newer sapo?")
        return cls(**saved)


class PromptSampler:
    """The data order: a seeded permutation per epoch, so the position is two integers."""

    def __init__(self, size: int, seed: int, epoch: int = 0, index: int = 0):
        if size == 0:
            raise ValueError("the training set is empty")
        self.size, self.seed, self.epoch, self.index = size, seed, epoch, index
        self._perm = self._permutation()

    def _permutation(self) -> list[int]:
        return np.random.RandomState((self.seed * 1_000_003 + self.epoch) % 2**32).permutation(self.size).tolist()

    def next(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            if self.index >= self.size:
                self.epoch, self.index = self.epoch + 1, 0
                self._perm = self._permutation()
            out.append(self._perm[self.index])
            self.index += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}
