"""Non-finite updates are skipped and counted, too many in a row stop the run (exit 3), and no
checkpoint ever holds a NaN/inf weight.

The non-finite values are real: a reward of +-3e38 with scale_rewards=none makes the policy loss
overflow float32 in the actual model's update (tests/reliability/user_rewards.py:huge_reward).
"""

from __future__ import annotations

import json

import pytest
import torch

from sapo.checkpoint import NonFiniteError, list_checkpoints, save_checkpoint
from tests.reliability.conftest import TINY, USER, cli, user_rewards_module

RUN = [*TINY, "save_steps=1", "keep_checkpoints=10", "eval_steps=0", "scale_rewards=none",
       f"rewards=[{USER}:huge_reward]"]


def _weights(path):
    return torch.load(path / "model.pt", weights_only=True)


def _run(tmp_path, monkeypatch, huge_calls: str, *extra: str) -> tuple[int, list[dict], dict]:
    monkeypatch.setenv("SAPO_TEST_HUGE_CALLS", huge_calls)
    user_rewards_module()._calls["n"] = 0
    out = tmp_path / "run"
    code = cli(["train", *RUN, f"output_dir={out}", *extra])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    checkpoints = {step: _weights(path) for step, path in list_checkpoints(out)}
    for step, weights in checkpoints.items():
        assert all(bool(torch.isfinite(w).all()) for w in weights.values()), f"checkpoint {step} is poisoned"
    return code, rows, checkpoints


def test_a_nonfinite_step_is_skipped_and_counted(sapo_cache, tmp_path, monkeypatch):
    code, rows, ckpts = _run(tmp_path, monkeypatch, "2", "max_steps=3")
    assert code == 0
    assert [r["nonfinite/skipped_total"] for r in rows] == [0.0, 2.0, 2.0]  # both updates of step 2
    assert "loss/total" in rows[0] and "loss/total" not in rows[1] and "loss/total" in rows[2]
    assert all(torch.equal(ckpts[1][k], ckpts[2][k]) for k in ckpts[1])  # step 2 left the weights alone
    assert any(not torch.equal(ckpts[2][k], ckpts[3][k]) for k in ckpts[2])  # step 3 trained again


def test_too_many_consecutive_nonfinite_updates_stop_the_run(sapo_cache, tmp_path, monkeypatch, capsys):
    code, rows, ckpts = _run(tmp_path, monkeypatch, "2,3,4,5", "max_steps=6", "max_consecutive_nonfinite=3")
    err = capsys.readouterr().err
    assert code == 3  # EXIT_NONFINITE: its own code, not a crash
    assert "stopped: 3 consecutive updates had non-finite loss or gradients (step 3)" in err
    assert "max_consecutive_nonfinite" in err
    assert [r["step"] for r in rows] == [1, 2] and sorted(ckpts) == [1, 2]
    assert not (tmp_path / "run" / "final_model").exists()


def test_checkpoint_refuses_nonfinite_weights(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path, 1, model=model, optimizer=optimizer, scheduler=None, trainer_state={})
    with torch.no_grad():
        model.weight[0, 1] = float("nan")
    with pytest.raises(NonFiniteError, match=r"not saving checkpoint-000002: non-finite weights in weight"):
        save_checkpoint(tmp_path, 2, model=model, optimizer=optimizer, scheduler=None, trainer_state={})
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000001"]
