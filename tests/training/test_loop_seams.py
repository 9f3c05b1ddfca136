"""The loop's seams on the tiny built-in model: the engine's weight sync, the policy version, the
TrainerState a checkpoint holds, and evaluation sampling from the training distribution."""

import dataclasses
import json

import pytest
import torch

from sapo.config import build_config
from sapo.evaluate import EvalSettings
from sapo.models.loading import load_model
from sapo.train import train
from sapo.training.state import TrainerState
from tests.training.conftest import TINY


def _rows(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _weights(folder):
    model, _ = load_model(str(folder))
    return model.state_dict()


def _same_rows(a, b):
    """Equal but for timings and the math-verify cache counters (per process: the second run in this
    process finds answers the first one verified)."""
    skip = ("time/", "tokens/", "math/", "async/sync_s")
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith(skip)} for r in rows]  # noqa: E731
    return strip(a) == strip(b)


def test_an_engine_with_its_own_copy_trains_exactly_like_the_live_one(tmp_path, sapo_cache):
    """torch-copy samples its own copy, refreshed by load_weights after every step: if the sync missed a
    tensor or came a step late, the rollouts (and everything after them) would differ."""
    runs = {}
    for engine in ("torch", "torch-copy"):
        out = tmp_path / engine
        train(build_config(overrides={**TINY, "engine": engine, "max_steps": "3", "lr": "1e-3",
                                      "output_dir": str(out)}))
        runs[engine] = out
    live, copied = _rows(runs["torch"]), _rows(runs["torch-copy"])
    assert _same_rows(live, copied)
    assert [r["async/staleness"] for r in copied] == [0.0, 0.0, 0.0]  # each batch sampled by the latest weights
    end_live, end_copy = _weights(runs["torch"] / "final_model"), _weights(runs["torch-copy"] / "final_model")
    assert all(torch.equal(end_live[k], end_copy[k]) for k in end_live)


def test_a_checkpoint_holds_exactly_the_trainer_state(tmp_path, sapo_cache):
    out = tmp_path / "state"
    train(build_config(overrides={**TINY, "max_steps": "2", "save_steps": "1", "output_dir": str(out)}))
    saved = json.loads((out / "checkpoint-000002" / "trainer_state.json").read_text())
    assert set(saved) == {f.name for f in dataclasses.fields(TrainerState)}
    state = TrainerState.from_dict(saved)
    assert (state.step, state.policy_version, state.max_steps, state.world_size) == (2, 1, 2, 1)
    assert state.data_index == 2 * int(TINY["prompts_per_step"])  # two steps of prompts drawn
    assert TrainerState.from_dict(state.to_dict()) == state


def test_trainer_state_reads_the_older_layout():
    old = {"step": 4, "data": {"epoch": 1, "index": 7}, "nonfinite_total": 0, "nonfinite_run": 0,
           "reward_counters": {}, "best_eval": 0.5, "max_steps": 10, "world_size": 1}
    state = TrainerState.from_dict(old)
    assert (state.data_epoch, state.data_index, state.policy_version) == (1, 7, 4)


def test_evaluation_samples_with_the_training_top_p_and_top_k_unless_told_otherwise():
    cfg = build_config(overrides={"top_p": "0.9", "top_k": "5", "temperature": "0.8"})
    settings = EvalSettings.from_config(cfg)
    assert (settings.temperature, settings.top_p, settings.top_k) == (0.8, 0.9, 5)
    cfg = build_config(overrides={"top_p": "0.9", "top_k": "5", "eval_top_p": "1.0", "eval_top_k": "0",
                                  "eval_temperature": "0.5"})
    settings = EvalSettings.from_config(cfg)
    assert (settings.temperature, settings.top_p, settings.top_k) == (0.5, 1.0, 0)


def test_evaluation_in_the_loop_uses_the_training_filter(tmp_path, sapo_cache, monkeypatch):
    """The engine is handed the training top_k when the loop evaluates (it ignored it before)."""
    import sapo.train as loop

    seen = []
    real = loop.make_engine

    def spy(name, model, **options):
        engine = real(name, model, **options)
        generate = engine.generate

        def recording(prompts, sampling, **kwargs):
            seen.append((sampling.greedy, sampling.top_k))
            return generate(prompts, sampling, **kwargs)

        engine.generate = recording
        return engine

    monkeypatch.setattr(loop, "make_engine", spy)
    train(build_config(overrides={**TINY, "top_k": "7", "max_steps": "1", "eval_steps": "1",
                                  "output_dir": str(tmp_path / "topk")}))
    assert (False, 7) in seen and all(top_k == 7 for _, top_k in seen)


def test_sapo_train_writes_the_report_when_the_run_finishes(tmp_path, sapo_cache):
    from sapo.cli import main

    out = tmp_path / "rep"
    args = [f"{k}={v}" for k, v in {**TINY, "max_steps": "1", "report": "true", "output_dir": str(out)}.items()]
    assert main(["train", *args]) == 0
    assert (out / "report.md").is_file() and "SAPO" in (out / "report.md").read_text()


def _digest(named):
    return [(n, t.detach().double().sum().item()) for n, t in named]


def test_max_staleness_samples_step_t_with_the_weights_after_step_t_minus_1_minus_k(tmp_path, sapo_cache, monkeypatch):
    """K = 2 (staleness_mode=sync): the engine's weights when step t samples are the trainer's after step
    max(0, t - 3), and the logged staleness is min(t - 1, K)."""
    from sapo.training import staleness

    trainer_versions, sampled_with = {}, {}
    record = staleness.WeightHistory.record

    def spy_record(self, version, model):
        trainer_versions[version] = _digest((n, p) for n, p in model.named_parameters() if p.requires_grad)
        return record(self, version, model)

    def spy_get(self, request):
        out = get(self, request)
        sampled_with[request.step] = (self.engine.policy_version, _digest(
            (n, p) for n, p in self.engine.model.named_parameters() if n in dict(trainer_versions[0])))
        return out

    get = staleness.LaggedSampler.get
    monkeypatch.setattr(staleness.WeightHistory, "record", spy_record)
    monkeypatch.setattr(staleness.LaggedSampler, "get", spy_get)
    out = tmp_path / "stale"
    train(build_config(overrides={**TINY, "max_staleness": "2", "staleness_mode": "sync", "max_steps": "5",
                                  "lr": "1e-3", "output_dir": str(out)}))
    assert [r["async/staleness"] for r in _rows(out)] == [0.0, 1.0, 2.0, 2.0, 2.0]
    for step, (version, digest) in sampled_with.items():
        assert version == max(0, step - 3)
        assert digest == trainer_versions[version], step
    assert trainer_versions[0] != trainer_versions[2]  # the weights did move


def test_staleness_needs_an_engine_with_its_own_weights(tmp_path):
    from sapo.config import ConfigError

    with pytest.raises(ConfigError, match="engine=hf samples the live model"):
        train(build_config(overrides={**TINY, "max_staleness": "1", "staleness_mode": "sync", "engine": "hf",
                                      "output_dir": str(tmp_path)}))
