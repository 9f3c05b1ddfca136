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


def test_corrections_against_the_stale_sampler_are_applied_and_logged(tmp_path, sapo_cache):
    """pi_old recomputed with the current weights, weighted by pi_old / pi_sampler (the sampler lagged a
    step): the weights differ from 1, and the mask mode drops some of them."""
    out = tmp_path / "is"
    train(build_config(overrides={**TINY, "max_staleness": "1", "staleness_mode": "sync", "max_steps": "3",
                                  "lr": "3e-3", "tis_cap": "1.02", "tis_mode": "token_mask", "tis_min": "0.98",
                                  "output_dir": str(out)}))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["is/masked_frac"] == 0.0  # step 1: sampled by the weights the updates start from
    assert rows[-1]["async/staleness"] == 1.0 and rows[-1]["is/masked_frac"] > 0.0
    assert rows[-1]["mismatch/abs_log_ratio_mean"] > 0.0


def test_lora_sends_only_the_adapters_and_async_still_equals_sync(tmp_path, sapo_cache, monkeypatch):
    from sapo.training import staleness

    kept = []
    record = staleness.WeightHistory.record

    def spy(self, version, model):
        record(self, version, model)
        kept.append(sorted(self.snapshots[version]))

    monkeypatch.setattr(staleness.WeightHistory, "record", spy)
    outs = {}
    for mode in ("sync", "async"):
        outs[mode] = tmp_path / mode
        train(build_config(overrides={**TINY, "max_staleness": "1", "staleness_mode": mode, "max_steps": "3",
                                      "lr": "1e-2", "lora_rank": "4", "output_dir": str(outs[mode])}))
    assert _rows(outs["sync"]) == _rows(outs["async"])
    assert kept and all(names and all("lora_" in n for n in names) for names in kept)


@pytest.mark.timeout(300)
def test_a_multithreaded_trainer_spawns_its_sampler_and_does_not_hang(tmp_path, sapo_cache):
    """threads=2: the trainer starts an OpenMP pool, after which a forked child would wait forever in its
    first parallel region; the sampler is spawned instead and the run finishes."""
    from sapo.training import async_sampler

    out = tmp_path / "threads2"
    starts = []
    original = async_sampler.mp.get_context

    def spy(method):
        starts.append(method)
        return original(method)

    async_sampler.mp.get_context = spy
    try:
        train(build_config(overrides={**TINY, "threads": "2", "max_staleness": "1", "max_steps": "2",
                                      "output_dir": str(out)}))
    finally:
        async_sampler.mp.get_context = original
        torch.set_num_threads(1)
    assert starts == ["spawn"]
    assert [r["async/staleness"] for r in _rows(out)] == [0.0, 1.0]
