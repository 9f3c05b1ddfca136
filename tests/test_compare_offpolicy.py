"""The off-policy study: its grids, custom axes, and the table / frontier built from synthetic runs."""

import json

import pytest

from sapo.compare import main as compare_main
from sapo.compare import write_summary
from sapo.compare_grids import WORKING_LR, RunSpec, custom_grid, make_grid
from sapo.config import build_config

# -- grids -------------------------------------------------------------------------------------


def test_offpolicy_grid_answers_the_questions_with_three_seeds():
    grid = make_grid("offpolicy")
    specs = grid.specs
    assert grid.base["staleness_mode"] == "sync" and grid.base["old_logprobs"] == "sampler"
    sapo_taus = {s.tau_pos for s in specs if s.loss_type == "sapo"}
    assert sapo_taus == {1, 3, 9, 27}
    # frontier in lr at K = 0 for every objective row, at two lrs or more
    for label in ("sapo tau=1", "sapo tau=3", "sapo tau=9", "sapo tau=27", "grpo", "grpo_r2", "gspo", "cispo"):
        lrs = {s.lr for s in specs if s.label == label and s.part == "frontier" and s.max_staleness == 0}
        assert len(lrs) >= 2, label
        ks = {s.max_staleness for s in specs if s.label == label and s.lr == WORKING_LR}
        assert {0, 8} <= ks, label
    # matched width (tau 9 against GRPO's 0.2) across staleness
    for label in ("sapo tau=9", "grpo", "grpo_r2", "gspo"):
        assert {s.max_staleness for s in specs if s.label == label and s.part == "staleness"} == {0, 2, 4, 8}
    ratios = {round(s.tau_neg / s.tau_pos, 6) for s in specs if s.tau_pos == 9}
    assert ratios == {1.0, 1.05, 1.5}
    assert {s.seed for s in specs} == {0, 1, 2}
    assert all(sum(1 for x in specs if x.cell == s.cell and x.part == s.part) == 3 for s in specs)
    assert len(grid.runs) == 108


def test_every_run_of_the_offpolicy_grids_is_a_valid_config():
    for name in ("offpolicy", "offpolicy-full", "offpolicy-smoke"):
        grid = make_grid(name)
        for spec in grid.runs:
            cfg = build_config(overrides=spec.overrides(grid.base))
            assert cfg.max_staleness == spec.max_staleness and cfg.lr == spec.lr
            if spec.loss_type == "grpo_r2":  # R2 needs a recomputed pi_old; the lag is corrected by TIS
                assert cfg.old_logprobs == "recompute" and cfg.tis_cap == 2 and cfg.routing_replay == "R2"
            else:
                assert cfg.old_logprobs == "sampler" and cfg.tis_cap == 0
            if spec.loss_type == "sapo":
                assert cfg.tau_pos == spec.tau_pos and cfg.tau_neg == spec.tau_neg


def test_full_grid_contains_the_offpolicy_runs_and_the_norm_lr_repeats():
    runs = {s.name for s in make_grid("offpolicy").runs}
    full = make_grid("offpolicy-full")
    assert runs < {s.name for s in full.runs}  # one --out folder: the full grid continues the short one
    repeats = [s for s in full.specs if s.part == "norm_lr_scale=1"]
    assert repeats and all(dict(s.extra)["norm_lr_scale"] == "1" for s in repeats)
    assert {s.loss_type for s in full.specs} >= {"sapo", "grpo", "grpo_r2", "gspo", "cispo", "dapo"}


def test_run_names_say_the_config_and_keep_the_moe_study_names():
    old = RunSpec("objectives", "sapo", "sapo", 1e-4, 4, 0)
    assert old.name == "sapo_moe_lr0.0001_mb4_tp1_tn1.05_s0"  # K = 0, no extra keys: unchanged
    lagged = RunSpec("staleness", "sapo", "sapo", 1e-4, 4, 0, max_staleness=2)
    assert lagged.name == "sapo_moe_lr0.0001_mb4_tp1_tn1.05_k2_s0"
    grid = make_grid("offpolicy")
    assert len({s.name for s in grid.runs}) == len(grid.runs)
    r2 = next(s for s in grid.runs if s.loss_type == "grpo_r2")
    assert "_olrecompute_tc2_" in r2.name
    sapo9 = next(s for s in grid.runs if s.label == "sapo tau=9")
    assert sapo9.tau_neg == 9.45 and "_tp9_tn9.45_" in sapo9.name


def test_custom_grid_is_the_product_of_the_axes():
    grid = custom_grid(objectives="sapo,grpo", taus="1,9", staleness="0,4", lrs="1e-4,2e-4", seeds="0,1")
    assert len(grid.runs) == (2 + 1) * 2 * 2 * 2  # sapo x 2 taus, grpo once; x lr x K x seeds
    assert {s.tau_pos for s in grid.specs if s.loss_type == "grpo"} == {1.0}
    assert grid.offpolicy
    with pytest.raises(ValueError, match="unknown.*nope"):
        custom_grid(objectives="sapo,nope")
    with pytest.raises(ValueError, match="--tau"):
        custom_grid(objectives="sapo", taus="one")


def test_cli_lists_a_custom_grid_and_rejects_bad_axes(capsys):
    assert compare_main(["--objectives", "sapo,cispo", "--tau", "3", "--staleness", "0,2", "--seeds", "0",
                         "--list"]) == 0
    out = capsys.readouterr().out
    assert "sapo_moe_lr0.0001_mb4_tp3_tn3.15_k2_s0" in out and "cispo_moe_lr0.0001_mb4" in out
    assert out.strip().endswith("4 runs x 50 steps")
    with pytest.raises(SystemExit) as e:
        compare_main(["--objectives", "sapo,bogus", "--list"])
    assert e.value.code == 2 and "bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare_main(["--grid", "offpolicy", "--objectives", "sapo", "--list"])


def test_cli_part_keeps_only_the_named_parts_of_a_grid(capsys):
    assert compare_main(["--grid", "offpolicy-full", "--part", "norm_lr_scale=1", "--list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "45 runs x 50 steps"  # 5 rows x K in {0, 2, 8} x 3 seeds
    assert all(line.split()[1] == "norm_lr_scale=1:" and "_nls1_" in line for line in lines[:-1])
    with pytest.raises(SystemExit) as e:
        compare_main(["--grid", "offpolicy", "--part", "frontier,nope", "--list"])
    assert e.value.code == 2 and "has the parts frontier, staleness, tau_ratio" in capsys.readouterr().err


# -- the summary, from synthetic runs --------------------------------------------------------------


def _fake_run(out, spec, evals, *, gate_pos=0.0, gate_neg=0.0, returncode=0, max_steps=3):
    run = out / "runs" / spec.name
    run.mkdir(parents=True)
    rows = []
    for step in range(max_steps + 1):
        row = {"step": step, "completion/length_mean": 10.0}
        if step in evals:
            row["eval/pass@1"] = evals[step]
        if step and spec.loss_type == "sapo":
            row.update({"sapo/gate_lt_0.5_frac_pos": gate_pos, "sapo/gate_lt_0.5_frac_neg": gate_neg})
        rows.append(row)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "study_run.json").write_text(json.dumps({"returncode": returncode, "nonfinite_stop": False}))


def test_offpolicy_table_frontier_and_plots_from_runs(tmp_path):
    grid = make_grid("offpolicy-smoke")  # sapo tau=9 at K = 0 and 2, grpo_r2 at K = 2; one seed; 3 steps
    sapo0, sapo2, r2 = grid.runs
    _fake_run(tmp_path, sapo0, {0: 0.2, 3: 0.3}, gate_pos=0.01, gate_neg=0.002)
    _fake_run(tmp_path, sapo2, {0: 0.2, 1: 0.4, 3: 0.1}, gate_pos=0.05, gate_neg=0.03)  # 0.1 < 0.5 x 0.4: collapse
    _fake_run(tmp_path, r2, {0: 0.2, 3: 0.25})
    text = write_summary(grid, tmp_path).read_text()
    assert text.startswith("# Off-policy study: grid `offpolicy-smoke`")
    assert "| sapo | tau=9 | staleness=0 | 1e-04 | 0.300 [0.300, 0.300] | 0/1 |" in text
    assert "| sapo | tau=9 | staleness=2 | 1e-04 | 0.100 [0.100, 0.100] | 1/1 |" in text
    assert "| grpo_r2 | - | staleness=2 | 1e-04 | 0.250 [0.250, 0.250] | 0/1 |" in text
    assert "| sapo | tau=9 | 2 | 1e-04 | 0.050 | 0.030 |" in text  # the gate by sign of A
    # largest stable staleness: 0 for sapo tau=9 (K = 2 collapsed), 2 for grpo_r2
    assert "| sapo tau=9 | 1e-04 | 1e-04 | - | 0 2 | 0 | 2 (1/1) |" in text
    assert "| grpo_r2 | - | - | - | 2 | 2 | - |" in text
    assert "Pass@1 0.400 (step 1) -> 0.100 (step 3)" in text
    assert (tmp_path / "offpolicy.csv").read_text().splitlines()[0].startswith("objective,tau,staleness,lr")
    for stem in ("staleness", "gate_vs_staleness"):
        assert (tmp_path / "plots" / f"{stem}.png").stat().st_size > 1000
