"""Crash safety: one run interrupted every way there is, then resumed, equals an uninterrupted run.

Every run is `python -m sapo train ...` in a subprocess with threads=1 and the same seed. The
interrupted run is killed before its first checkpoint, stopped with a real Ctrl-C (SIGINT),
SIGKILLed half-way through writing a checkpoint and SIGKILLed in the middle of an update, and
resumed after each; it must end with bit-identical weights and metrics.jsonl rows (wall-time keys
aside) and a resume of the finished run must say so and exit 0.
"""

from __future__ import annotations

import signal
import subprocess
import time
import warnings
from pathlib import Path

import pytest
import torch

from sapo.checkpoint import list_checkpoints
from sapo.cli import main
from tests.reliability.conftest import (
    REPO,
    TINY,
    USER,
    checkpoint_weights,
    metric_rows,
    run_sapo,
    sapo_cmd,
    sapo_env,
)

MAX_STEPS = 4
# varied rewards (non-zero gradients), a KL reference (must survive resume), eval mid-run
RUN = [*TINY, f"max_steps={MAX_STEPS}", "save_steps=1", "keep_checkpoints=2", "eval_steps=2", "beta=0.01",
       f"rewards=[math,{USER}:length_reward]"]
TRUST = "trust_saved_rewards=true"  # the saved config names user reward code (test_run_safety.py)


def _steps(out: Path) -> list[int]:
    return [s for s, _ in list_checkpoints(out)]


@pytest.fixture(scope="module")
def reference_run(sapo_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    proc = run_sapo(sapo_cache, ["train", *RUN, f"output_dir={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_reference_run_changes_the_weights(reference_run):
    # otherwise "resume gives the same weights" would hold trivially
    first = torch.load(sorted(reference_run.glob("checkpoint-*"))[0] / "model.pt", weights_only=True)
    last = checkpoint_weights(reference_run)
    assert any(not torch.equal(first[k], last[k]) for k in first)
    assert _steps(reference_run) == [MAX_STEPS - 1, MAX_STEPS]


def _signal_after_first_checkpoint(cache: Path, out: Path, args: list[str], sig=signal.SIGINT, times: int = 1):
    """Run `sapo train ARGS`, send `sig` (`times` times, 0.3 s apart) once a checkpoint of `out`
    exists (the next step's slowed reward is then running; in the rare case it lands before the
    step's last line, the run stops there)."""
    env = sapo_env(cache, SAPO_TEST_REWARD_SLEEP="2")
    proc = subprocess.Popen(sapo_cmd("train", *args), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while proc.poll() is None and time.monotonic() < deadline and not _steps(out):
        time.sleep(0.02)
    for _ in range(times):
        time.sleep(0.3)
        proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=180)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_interrupted_every_way_then_resumed_is_bit_identical(reference_run, sapo_cache, tmp_path):
    out = tmp_path / "run"
    # 1. SIGKILL in the middle of step 1: no checkpoint yet
    proc = run_sapo(sapo_cache, ["train", *RUN, f"output_dir={out}"], SAPO_TEST_KILL_AT="step:1")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert _steps(out) == [] and (out / "config.yaml").exists()

    # 2. resume: warns and starts from step 0; Ctrl-C in step 2 checkpoints step 2 and exits 0
    proc = _signal_after_first_checkpoint(sapo_cache, out, [f"resume={out}", TRUST])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no complete checkpoint found" in proc.stderr and "starting again from step 0" in proc.stderr
    assert "interrupt: finishing this step" in proc.stdout and f"resume with: sapo train resume={out}" in proc.stdout
    stopped = _steps(out)[-1]
    assert stopped in (1, 2) and [r["step"] for r in metric_rows(out)] == list(range(stopped + 1))
    assert not (out / "final_model").exists()

    # 3. SIGKILL after part of checkpoint-3 is written: the partial folder is ignored
    proc = run_sapo(sapo_cache, ["train", f"resume={out}", TRUST], SAPO_TEST_KILL_AT="checkpoint:3")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert "resuming" in proc.stdout and f"from step {stopped}" in proc.stdout
    assert _steps(out) == [1, 2] and (out / "checkpoint-000003.tmp" / "model.pt").exists()

    # 4. SIGKILL in the middle of step 4 (after its first optimizer update)
    proc = run_sapo(sapo_cache, ["train", f"resume={out}", TRUST], SAPO_TEST_KILL_AT="step:4")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert _steps(out) == [2, 3] and not list(out.glob("*.tmp"))
    assert [r["step"] for r in metric_rows(out)] == [0, 1, 2, 3]

    # 5. the last resume finishes the run
    proc = run_sapo(sapo_cache, ["train", f"resume={out}", TRUST])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "from step 3" in proc.stdout and (out / "final_model" / "config.json").exists()

    got, want = metric_rows(out), metric_rows(reference_run)
    assert [r["step"] for r in got] == list(range(MAX_STEPS + 1))
    for g, w in zip(got, want):
        assert g == w, {k: (g.get(k), w.get(k)) for k in set(g) | set(w) if g.get(k) != w.get(k)}
    a, b = checkpoint_weights(out), checkpoint_weights(reference_run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _steps(out) == [MAX_STEPS - 1, MAX_STEPS]

    # 6. resuming the finished run: says so, exits 0, touches nothing
    before = (out / "metrics.jsonl").read_text()
    proc = run_sapo(sapo_cache, ["train", f"resume={out}"])  # a finished run imports no reward code: no trust
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"already finished at step {MAX_STEPS}" in proc.stdout
    assert (out / "metrics.jsonl").read_text() == before


def test_new_run_into_a_folder_with_checkpoints_is_refused(reference_run, sapo_cache, capsys):
    before = {p: p.stat().st_mtime_ns for p in reference_run.rglob("*")}
    with warnings.catch_warnings():
        code = main(["train", *RUN, f"output_dir={reference_run}"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"output_dir={reference_run} already holds a run with checkpoints" in err
    assert f"resume={reference_run}" in err and "nothing was overwritten" in err
    assert {p: p.stat().st_mtime_ns for p in reference_run.rglob("*")} == before


def test_resume_refuses_changed_keys_and_missing_runs(reference_run, tmp_path, capsys):
    assert main(["train", f"resume={reference_run}", "lr=0.5"]) == 2
    assert "cannot change on resume: lr" in capsys.readouterr().err
    assert main(["train", f"resume={tmp_path}"]) == 2
    assert "no config.yaml there" in capsys.readouterr().err


def test_sigterm_checkpoints_at_the_end_of_the_step_and_exits_0(sapo_cache, tmp_path):
    """Schedulers send SIGTERM before they pre-empt a job: it is handled like Ctrl-C."""
    out = tmp_path / "run"
    proc = _signal_after_first_checkpoint(sapo_cache, out, [*RUN, f"output_dir={out}"], signal.SIGTERM)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "interrupt: finishing this step" in proc.stdout
    stopped = _steps(out)[-1]
    assert stopped < MAX_STEPS and [r["step"] for r in metric_rows(out)] == list(range(stopped + 1))


def test_second_ctrl_c_aborts_at_once_and_the_run_resumes_exactly(reference_run, sapo_cache, tmp_path):
    """A second Ctrl-C stops without finishing the step or saving (exit 130); what was saved before
    stays valid, and resuming from it ends bit-identical to the uninterrupted run."""
    out = tmp_path / "run"
    proc = _signal_after_first_checkpoint(sapo_cache, out, [*RUN, f"output_dir={out}"], times=2)
    assert proc.returncode == 130, (proc.returncode, proc.stderr[-3000:])
    assert "interrupt: finishing this step" in proc.stdout and "interrupted" in proc.stderr
    saved = _steps(out)
    assert saved and saved[-1] < MAX_STEPS and not list(out.glob("*.tmp"))
    assert not (out / "final_model").exists()
    proc = run_sapo(sapo_cache, ["train", f"resume={out}", TRUST])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in metric_rows(out)] == list(range(MAX_STEPS + 1))
    a, b = checkpoint_weights(out), checkpoint_weights(reference_run)
    assert all(torch.equal(a[k], b[k]) for k in a)
