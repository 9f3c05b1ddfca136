"""bench/demo_seeds.py's table: the step-0 -> final figures, the targets, and the --also-eval column, on
synthetic run folders (no training)."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def demo_seeds(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import demo_seeds

    yield demo_seeds
    sys.modules.pop("demo_seeds", None)


def fake_run(folder: Path, start: dict, end: dict) -> Path:
    folder.mkdir(parents=True)
    rows = [{"step": 0, **start}, {"step": 1, "reward/mean": 0.5, "time/step": 2.0}, {"step": 1, **end}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def metrics(greedy, t1, t03):
    return {"eval/pass@1": t1, "eval/greedy": greedy, "eval/pass@1_T1": t1, "eval/pass@1_T0.3": t03, "eval/pass@8": 0.6}


def test_targets_use_the_warm_starts_best_temperature_and_also_eval_is_reused(demo_seeds, tmp_path):
    learnt = fake_run(tmp_path / "a", metrics(0.15, 0.18, 0.21), metrics(0.60, 0.50, 0.62))
    sharpened = fake_run(tmp_path / "b", metrics(0.60, 0.30, 0.62), metrics(0.58, 0.60, 0.61))
    a, b = demo_seeds.seed_row(learnt), demo_seeds.seed_row(sharpened)
    assert a["best_t_name"] == "0.3" and a["best_t"] == (0.21, 0.62)
    assert all(demo_seeds.checks(a).values())
    assert demo_seeds.checks(b) == {"greedy": False, "t1": True, "best_t": False}  # T = 1 alone is not enough

    saved = {"spec": "builtin:vl-digits", "warm_start": {"greedy": 0.485, "pass@1": 0.40, "num_problems": 200},
             "rl": {"greedy": 0.545, "pass@1": 0.47, "num_problems": 200}}
    (learnt / "also_eval.json").write_text(json.dumps(saved))
    a["also"] = demo_seeds.also_eval(learnt, "builtin:vl-digits")  # the saved result: nothing is evaluated
    assert a["also"] == saved
    lines = demo_seeds.table({0: a, 1: b})
    assert lines[0].endswith("| builtin:vl-digits: greedy / Pass@1 T = 1 |")
    assert lines[2].endswith("| all met | 0.485 -> 0.545 (+0.060) / 0.400 -> 0.470 (200 problems) |")
    assert "greedy missed, best_t missed" in lines[3] and lines[3].endswith("| - |")
    assert len({line.count("|") for line in lines}) == 1  # every row has every column
