"""Bounded, deterministic staleness: RL step t samples with the weights as they were after step
t - 1 - K (max_staleness = K; the initial weights while t <= K + 1).

K = 0 is the synchronous loop: every batch is sampled by the weights the updates start from. With
K >= 1 the rollout engine holds its own copy of the weights (another process in staleness_mode=async,
the same process in sync) and the lag is a fixed function of the step, never of timing, so a run is
reproducible and resumable bit for bit. `WeightHistory` keeps the trainable weights of the versions
the coming steps will sample with (K + 1 snapshots at most; LoRA: only the adapters).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from sapo.rollout import RolloutBatch, RolloutEngine, SamplingParams


def sampling_version(step: int, max_staleness: int) -> int:
    """The weights version (optimizer step) that samples RL step `step` (1-based)."""
    return max(0, step - 1 - max_staleness)


class WeightHistory:
    def __init__(self, max_staleness: int):
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        self.max_staleness = max_staleness
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}  # version -> {name: cpu tensor}

    def record(self, version: int, model: torch.nn.Module) -> None:
        """Keep the trainable weights after optimizer step `version`; forget what no later step needs."""
        self.snapshots[version] = {n: p.detach().to("cpu", copy=True)
                                   for n, p in model.named_parameters() if p.requires_grad}
        for old in [v for v in self.snapshots if v < version - self.max_staleness]:
            del self.snapshots[old]

    def weights(self, version: int) -> Iterator[tuple[str, torch.Tensor]]:
        if version not in self.snapshots:
            raise KeyError(f"weights version {version} is not kept (kept: {sorted(self.snapshots)})")
        return iter(self.snapshots[version].items())

    def state(self) -> dict[str, dict[str, torch.Tensor]]:
        """For a checkpoint: {str(version): weights}."""
        return {str(v): dict(w) for v, w in self.snapshots.items()}

    def load_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        self.snapshots = {int(v): dict(w) for v, w in state.items()}


@dataclass
class RolloutRequest:
    """What RL step `step` samples: fixed before it is sampled, so the sampler may run ahead."""

    step: int
    prompt_ids: list[list[int]]
    sampling: SamplingParams  # without a generator: `seed` makes the step's stream
    seed: int
    extra_inputs: list[dict] | None
    version: int  # the weights that must sample it: sampling_version(step, K)

    def stream(self) -> SamplingParams:
        return self.sampling.replace(generator=torch.Generator().manual_seed(self.seed))


@dataclass
class Sampled:
    batch: RolloutBatch
    seconds: float  # generating
    metrics: dict[str, float]  # async/*: sync_s, sampler_wait_s, trainer_wait_s


class LaggedSampler:
    """staleness_mode=sync: in this process, step t loads the kept weights of its version, then samples."""

    def __init__(self, engine: RolloutEngine, history: WeightHistory):
        if not engine.owns_weights:
            raise ValueError("a lagging sampler needs an engine with its own copy of the weights")
        self.engine, self.history = engine, history

    def get(self, request: RolloutRequest) -> Sampled:
        t0 = time.perf_counter()
        if self.engine.policy_version != request.version:
            self.engine.load_weights(self.history.weights(request.version), version=request.version)
        t1 = time.perf_counter()
        batch = self.engine.generate(request.prompt_ids, request.stream(), extra_inputs=request.extra_inputs)
        return Sampled(batch, time.perf_counter() - t1,
                       {"async/sync_s": t1 - t0, "async/sampler_wait_s": 0.0, "async/trainer_wait_s": 0.0})

    def weights_ready(self, version: int, model: torch.nn.Module) -> float:
        """The weights after optimizer step `version` exist; keep them for the step that samples with them."""
        t0 = time.perf_counter()
        self.history.record(version, model)
        return time.perf_counter() - t0

    def close(self) -> None:
        pass
