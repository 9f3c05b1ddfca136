"""The run report from a metrics.jsonl: its tables and one plot per panel that has data."""

import json

from sapo.report import write_report


def test_report_plots_the_gate_beside_the_staleness_and_the_sampler_weights(tmp_path):
    rows = [{"step": 0, "eval/pass@1": 0.25, "eval/greedy": 0.5, "eval/num_problems": 8, "eval/num_samples": 2}]
    for step in range(1, 4):
        rows.append({"step": step, "reward/mean": 0.1 * step, "sapo/gate_mean": 0.99, "sapo/gate_mean_pos": 0.99,
                     "sapo/gate_mean_neg": 0.98, "sapo/gate_lt_0.5_frac": 0.0, "async/staleness": min(step - 1, 1),
                     "async/trainer_wait_s": 0.01, "async/sampler_wait_s": 0.2, "async/sync_s": 0.001,
                     "is/weight_mean": 0.97, "is/masked_frac": 0.02, "time/step": 1.0})
    rows.append({"step": 3, "eval/pass@1": 0.5, "eval/greedy": 0.625, "eval/num_problems": 8,
                 "eval/num_samples": 2})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = write_report(tmp_path).read_text()
    plots = {p.stem for p in (tmp_path / "plots").glob("*.png")}
    assert {"reward", "pass_at_1", "sapo_gate", "staleness", "sampler_correction"} <= plots
    assert "clipping" not in plots and "moe" not in plots  # no data, no empty plot
    assert "| `async/staleness` | 0.6667 | 1 |" in report
    assert "Pass@1 went from 0.250 (step 0) to 0.500 (step 3)" in report


def test_report_plots_pass_at_1_against_temperature_for_the_start_and_the_end(tmp_path):
    rows = [{"step": 0, "eval/pass@1": 0.25, "eval/greedy": 0.5, "eval/pass@1_T0.5": 0.5, "eval/pass@1_T1": 0.25},
            {"step": 1, "reward/mean": 0.5, "time/step": 1.0},
            {"step": 2, "eval/pass@1": 0.5, "eval/greedy": 0.5},  # an intermediate evaluation: no sweep
            {"step": 4, "eval/pass@1": 0.625, "eval/greedy": 0.75, "eval/pass@1_T0.5": 0.75, "eval/pass@1_T1": 0.625}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = write_report(tmp_path).read_text()
    assert (tmp_path / "plots" / "pass_at_1_temperature.png").exists()
    assert "| step 0 (start) | 0.500 | 0.250 | 0.500 (T = 0.5) | 0.500 |" in report
    assert "| step 4 (final) | 0.750 | 0.625 | 0.750 (T = 0.5) | 0.750 |" in report
    assert "At the starting policy's best temperature (T = 0.5) Pass@1 went from 0.500 to 0.750 (+25.0 points;" in report
