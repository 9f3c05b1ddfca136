"""Asynchronous rollouts: the sampler in its own process gives exactly what the same lag gives in one
process (same seed, one torch thread per forward on both sides)."""

import json

import pytest
import torch

from sapo.config import build_config
from sapo.models.loading import load_model
from sapo.train import train
from tests.training.conftest import TINY

TIMING = ("time/", "tokens/", "math/", "async/sync_s", "async/sampler_wait_s", "async/trainer_wait_s")


def _rows(folder):
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]


@pytest.mark.parametrize("max_staleness", [1, 2])
def test_async_equals_sync_with_the_same_lag(tmp_path, sapo_cache, max_staleness):
    outs = {}
    for mode in ("sync", "async"):
        outs[mode] = tmp_path / mode
        train(build_config(overrides={**TINY, "max_staleness": str(max_staleness), "staleness_mode": mode,
                                      "max_steps": "4", "lr": "1e-3", "routing_replay": "R3", "loss_type": "grpo",
                                      "output_dir": str(outs[mode])}))
    sync, asynchronous = _rows(outs["sync"]), _rows(outs["async"])
    assert sync == asynchronous
    assert [r["async/staleness"] for r in asynchronous] == [min(t, max_staleness) for t in range(4)]
    a, _ = load_model(str(outs["sync"] / "final_model"))
    b, _ = load_model(str(outs["async"] / "final_model"))
    sb = b.state_dict()
    assert all(torch.equal(v, sb[k]) for k, v in a.state_dict().items())
    waits = [json.loads(line) for line in (outs["async"] / "metrics.jsonl").read_text().splitlines()]
    assert all(r["async/trainer_wait_s"] >= 0 and r["async/sampler_wait_s"] >= 0 for r in waits)
