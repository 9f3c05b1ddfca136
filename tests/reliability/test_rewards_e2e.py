"""A user reward function that raises or hangs gives 0.0, is counted and warned about once (with
its traceback), and never crashes or hangs `sapo train`.

Unit tests of the runner: tests/rewards/test_runner.py; math-verify pathologies (huge, deeply
nested, adversarial answers) are bounded in tests/rewards/test_math_reward.py and test_extract.py.
"""

from __future__ import annotations

import json
import logging
import time

from tests.reliability.conftest import TINY, USER, cli


def test_raising_and_hanging_rewards_score_zero_and_are_counted(sapo_cache, tmp_path, caplog):
    out = tmp_path / "run"
    t0 = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="sapo.rewards.runner"):
        code = cli(["train", *TINY, "max_steps=2", "eval_steps=0", f"output_dir={out}", "reward_timeout=1",
                    f"rewards=[math,{USER}:hanging_reward,{USER}:raising_reward]"])
    assert code == 0
    assert time.perf_counter() - t0 < 60  # two 1 s timeouts, not a hang
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward/timeouts/hanging_reward"] for r in rows] == [1.0, 2.0]
    assert [r["reward/errors/raising_reward"] for r in rows] == [1.0, 2.0]
    assert [r["reward/errors/math"] + r["reward/timeouts/math"] for r in rows] == [0.0, 0.0]
    for row in rows:
        assert row["reward/hanging_reward/mean"] == row["reward/raising_reward/mean"] == 0.0
        assert row["reward/mean"] == row["reward/math/mean"]  # the failed functions added 0.0
    warnings_ = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    hang = [w for w in warnings_ if "'hanging_reward'" in w]
    boom = [w for w in warnings_ if "'raising_reward'" in w]
    assert len(hang) == 1 and "did not return within 1.0 s" in hang[0]  # once, then only counted
    assert len(boom) == 1 and "Traceback" in boom[0]
    assert "RuntimeError: user reward exploded on purpose" in boom[0]
