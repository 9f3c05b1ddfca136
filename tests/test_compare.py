"""The MoE stability study runner: grids, collapse rules on synthetic metric rows, the smoke grid end to end."""

import csv
import json

import pytest

from sapo.compare import (
    CAP_WINDOW,
    OBJECTIVES,
    RunSpec,
    detect_collapse,
    frontier_rows,
    is_complete,
    make_grid,
    run_study,
    write_summary,
)


def _evals(*values, start=0, every=10):
    return [{"step": start + i * every, "eval/pass@1": v} for i, v in enumerate(values)]


# -- collapse rules ---------------------------------------------------------------------------


def test_stable_run_is_not_collapsed():
    rows = _evals(0.21, 0.24, 0.26, 0.25) + [{"step": s, "completion/length_mean": 20.0} for s in range(1, 31)]
    out = detect_collapse(rows, max_completion_length=48)
    assert not out.collapsed and out.reasons == [] and out.step is None


def test_pass_at_1_below_half_its_best_after_the_best():
    out = detect_collapse(_evals(0.21, 0.30, 0.14, 0.12), max_completion_length=48)
    assert out.collapsed and out.step == 20  # 0.14 < 0.5 * 0.30 at step 20
    assert out.reasons == ["Pass@1 0.300 (step 10) -> 0.140 (step 20)"]


def test_exactly_half_is_not_collapse_and_a_drop_before_the_best_does_not_count():
    assert not detect_collapse(_evals(0.30, 0.15), max_completion_length=48).collapsed  # 0.15 == 0.5 * 0.30
    assert not detect_collapse(_evals(0.10, 0.02, 0.30), max_completion_length=48).collapsed


def test_near_zero_best_is_noise_not_collapse():
    assert not detect_collapse(_evals(0.04, 0.0), max_completion_length=48).collapsed


def test_lead_measured_lr_3e4_collapse_is_detected():
    # warm start Pass@1 0.21 at step 0, -> 0 within 25 steps (the lead's lr 3e-4 run)
    out = detect_collapse(_evals(0.21, 0.12, 0.01), max_completion_length=48)
    assert out.collapsed and out.step == 20  # 0.12 is above 0.105, 0.01 is below


def test_length_stuck_at_the_cap():
    short = [{"step": s, "completion/length_mean": 20.0} for s in range(1, 6)]
    capped = [{"step": s, "completion/length_mean": 47.0} for s in range(6, 6 + CAP_WINDOW)]
    out = detect_collapse(short + capped, max_completion_length=48)
    assert out.collapsed and out.step == 5 + CAP_WINDOW and out.reasons == [f"length at cap for {CAP_WINDOW} steps"]
    # one step short of the window, or interrupted by a shorter step: no collapse
    assert not detect_collapse(short + capped[:-1], max_completion_length=48).collapsed
    broken = capped[:2] + [{"step": 100, "completion/length_mean": 30.0}] + capped[2:]
    assert not detect_collapse(broken, max_completion_length=48).collapsed


def test_non_finite_stop_and_values():
    rows = _evals(0.21, 0.22)
    out = detect_collapse(rows, max_completion_length=48, nonfinite_stop=True)
    assert out.collapsed and out.reasons == ["non-finite stop"] and out.step == 10
    # metrics.jsonl writes NaN as the string "nan"
    out = detect_collapse(rows + [{"step": 11, "loss/total": "nan"}], max_completion_length=48)
    assert out.reasons == ["non-finite loss/total"] and out.step == 11


# -- grids -------------------------------------------------------------------------------------


def test_grids_cover_the_study_and_share_configs():
    grid = make_grid("default")
    labels = {s.label for s in grid.specs}
    assert set(OBJECTIVES) | {"tau_neg=0.95", "tau_neg=1", "tau_neg=1.05"} <= labels
    assert {s.num_minibatches for s in grid.specs if s.part == "objectives"} == {4, 8}
    assert {s.model for s in grid.specs if s.part == "dense_vs_moe"} == {"builtin:arith-dense", "builtin:arith-moe"}
    # tau_neg=1.05 is the sapo default at the same lr: one folder, run once
    sapo = RunSpec("objectives", "sapo", "sapo", 1e-4, 4, 0)
    assert sapo.name == RunSpec("tau_neg", "tau_neg=1.05", "sapo", 1e-4, 4, 0, tau_neg=1.05).name
    assert len(grid.runs) == 84 and len(grid.runs) < len(grid.specs)
    assert {s.seed for s in grid.specs if s.part in ("objectives", "frontier")} == {0, 1, 2}  # >= 3 seeds a curve
    full = make_grid("full")
    assert {s.seed for s in full.specs} == {0, 1, 2} and {s.num_minibatches for s in full.specs if
                                                           s.part == "frontier"} == {4, 8}
    with pytest.raises(ValueError, match="smoke, default, full"):
        make_grid("huge")


def test_grpo_r2_run_gets_replay_from_its_preset():
    from sapo.config import build_config

    grid = make_grid("default")
    spec = next(s for s in grid.runs if s.loss_type == "grpo_r2")
    cfg = build_config(overrides=spec.overrides(grid.base))
    assert cfg.routing_replay == "R2" and cfg.loss_type == "grpo_r2"


def test_frontier_is_the_largest_lr_where_every_seed_is_stable():
    from sapo.compare import Collapse, RunResult

    def result(lr, seed, best, collapsed=False):
        collapse = Collapse()
        if collapsed:
            collapse.add("synthetic", 5)
        return RunResult(RunSpec("frontier", "sapo", "sapo", lr, 4, seed), "collapsed" if collapsed else "done",
                         collapse, [], [(0, 0.2), (10, best)], {})

    key = ("frontier", "sapo", "builtin:arith-moe", 4)
    groups = {(*key, 3e-5, 1.0, 1.05): [result(3e-5, 0, 0.22), result(3e-5, 1, 0.24)],
              (*key, 1e-4, 1.0, 1.05): [result(1e-4, 0, 0.30), result(1e-4, 1, 0.26)],
              (*key, 3e-4, 1.0, 1.05): [result(3e-4, 0, 0.35), result(3e-4, 1, 0.1, collapsed=True)]}
    (row,) = frontier_rows(groups)
    assert row["max_stable_lr"] == 1e-4 and row["collapsed_lrs"] == "3e-04" and row["lrs"] == "3e-05 1e-04 3e-04"
    assert row["best_pass1"] == pytest.approx(0.28) and row["best_pass1_lr"] == 1e-4


# -- the smoke grid, end to end ------------------------------------------------------------------


def test_smoke_grid_end_to_end_and_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("SAPO_CACHE", str(tmp_path / "cache"))
    grid = make_grid("smoke")
    out = tmp_path / "study"
    results = run_study(grid, out, log=lambda *_: None)
    assert [rc for _, rc in results] == [0, 0] and len(grid.runs) == 2
    for spec in grid.runs:
        run_dir = out / "runs" / spec.name
        assert is_complete(run_dir, 2)
        assert json.loads((run_dir / "study_run.json").read_text())["returncode"] == 0
    table = write_summary(grid, out)
    text = table.read_text()
    assert "| objectives | sapo |" in text and "| objectives | grpo_r2 |" in text and "Stability frontier" in text
    with open(out / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["part"], r["label"]) for r in rows] == [
        ("objectives", "sapo"), ("objectives", "grpo_r2"), ("frontier", "sapo"), ("frontier", "grpo_r2"),
        ("dense_vs_moe", "sapo")]
    assert all(r["finished"] == "1" and r["collapsed"] == "0" and r["pass1_start"] != "" for r in rows)
    for stem in ("pass_at_1", "frontier", "dense_vs_moe"):
        assert (out / "plots" / f"{stem}.png").stat().st_size > 1000
    # a second call finds every run finished and starts nothing
    again = run_study(grid, out, log=lambda *_: None)
    assert [rc for _, rc in again] == [None, None]
    # raising max_steps makes a finished run unfinished: it resumes from its checkpoint, not from scratch
    from sapo.compare import StudyGrid
    from sapo.tracking import read_metrics

    longer = StudyGrid("smoke", {**grid.base, "max_steps": "3"}, [grid.runs[0]])
    (result,) = run_study(longer, out, log=lambda *_: None)
    run_dir = out / "runs" / grid.runs[0].name
    commands = [line for line in (run_dir / "study.log").read_text().splitlines() if " -m sapo train " in line]
    assert result[1] == 0 and len(commands) == 2
    assert "resume=" not in commands[0] and f"resume={run_dir} max_steps=3" in commands[1]
    assert sorted({int(r["step"]) for r in read_metrics(run_dir)}) == [0, 1, 2, 3]
