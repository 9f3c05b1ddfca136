"""Crash safety: SIGKILL mid-step and mid-checkpoint, Ctrl-C, resume == an uninterrupted run.

Every run is `python -m sapo train ...` in a subprocess with threads=1 and the same seed; the
resumed runs must end with bit-identical weights and metrics.jsonl rows (wall-time keys aside).
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, USER, checkpoint_weights, metric_rows, run_sapo, sapo_cmd, sapo_env

from sapo.checkpoint import list_checkpoints

MAX_STEPS = 4
# varied rewards (non-zero gradients), a KL reference (must survive resume), eval mid-run
RUN = [*TINY, f"max_steps={MAX_STEPS}", "save_steps=1", "keep_checkpoints=2", "eval_steps=2", "beta=0.01",
       f"rewards=[math,{USER}:length_reward]"]


def _train(cache: Path, out: Path, *extra: str, **env: str) -> subprocess.CompletedProcess:
    return run_sapo(cache, ["train", *RUN, f"output_dir={out}", *extra], **env)


def _resume(cache: Path, out: Path, **env: str) -> subprocess.CompletedProcess:
    return run_sapo(cache, ["train", f"resume={out}"], **env)


@pytest.fixture(scope="module")
def reference_run(sapo_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    proc = _train(sapo_cache, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _assert_same_run(out: Path, reference: Path) -> None:
    got, want = metric_rows(out), metric_rows(reference)
    assert [r["step"] for r in got] == list(range(MAX_STEPS + 1))
    for g, w in zip(got, want):
        assert g == w, {k: (g.get(k), w.get(k)) for k in set(g) | set(w) if g.get(k) != w.get(k)}
    a, b = checkpoint_weights(out), checkpoint_weights(reference)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert [s for s, _ in list_checkpoints(out)] == [MAX_STEPS - 1, MAX_STEPS]


def test_reference_run_changes_the_weights(reference_run, sapo_cache):
    # otherwise "resume gives the same weights" would hold trivially
    from sapo.models.loading import load_model

    first = torch.load(sorted(reference_run.glob("checkpoint-*"))[0] / "model.pt", weights_only=True)
    final, _ = load_model(str(reference_run / "final_model"), dtype="float32", device="cpu")
    changed = [n for n, p in final.named_parameters() if n in first and not torch.equal(p.detach(), first[n])]
    assert changed


@pytest.mark.parametrize("where", ["step:3", "checkpoint:3"])
def test_sigkill_then_resume_is_bit_identical(where, reference_run, sapo_cache, tmp_path):
    out = tmp_path / "run"
    proc = _train(sapo_cache, out, SAPO_TEST_KILL_AT=where)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert [s for s, _ in list_checkpoints(out)] == [1, 2]  # the step-3 checkpoint never completed
    if where.startswith("checkpoint"):
        assert (out / "checkpoint-000003.tmp" / "model.pt").exists()  # killed half-way through writing it
    proc = _resume(sapo_cache, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming" in proc.stdout and "from step 2" in proc.stdout
    assert not list(out.glob("*.tmp"))
    _assert_same_run(out, reference_run)


def test_ctrl_c_checkpoints_at_step_end_then_resume(reference_run, sapo_cache, tmp_path):
    out = tmp_path / "run"
    env = sapo_env(sapo_cache, SAPO_TEST_REWARD_SLEEP="0.4")
    cmd = sapo_cmd("train", *RUN, f"output_dir={out}", "max_steps=40")
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[2], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and '"step": 1' in metrics.read_text():
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr[-3000:]
    assert "interrupt: finishing this step" in stdout and "resume with" in stdout
    rows = metric_rows(out)
    stopped = rows[-1]["step"]
    assert 1 <= stopped < MAX_STEPS, stopped
    assert list_checkpoints(out)[-1][0] == stopped  # checkpoint of the step that was running
    assert not (out / "final_model").exists()
    proc = _resume(sapo_cache, out, **{"max_steps": "x"}) if False else run_sapo(
        sapo_cache, ["train", f"resume={out}", f"max_steps={MAX_STEPS}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_run(out, reference_run)
