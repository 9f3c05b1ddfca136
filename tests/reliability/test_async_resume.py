"""An asynchronous run (max_staleness=1, the sampler in its own process) SIGKILLed mid-update, then
resumed, ends with the uninterrupted run's metrics and weights: the checkpoint holds the weight
versions the next steps sample with, and the killed trainer's sampler process does not outlive it."""

from __future__ import annotations

import os
import time
import uuid

import torch

from tests.reliability.conftest import TINY, checkpoint_weights, metric_rows, run_sapo

RUN = [*TINY, "max_steps=4", "save_steps=1", "keep_checkpoints=2", "eval_steps=0", "max_staleness=1",
       "staleness_mode=async", "lr=1e-3"]


def _tagged(tag: str) -> set[int]:
    """PIDs of live processes started with SAPO_TEST_RUN_TAG=tag (a forked sampler inherits it)."""
    found = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                environ = open(f"/proc/{pid}/environ", "rb").read()
            except OSError:
                continue
            if f"SAPO_TEST_RUN_TAG={tag}".encode() in environ.split(b"\0"):
                found.add(int(pid))
    return found


def test_killed_async_run_resumes_to_the_uninterrupted_result(sapo_cache, tmp_path):
    reference = tmp_path / "reference"
    done = run_sapo(sapo_cache, ["train", *RUN, f"output_dir={reference}"])
    assert done.returncode == 0, done.stderr[-3000:]

    out = tmp_path / "killed"
    tag = uuid.uuid4().hex
    killed = run_sapo(sapo_cache, ["train", *RUN, f"output_dir={out}"], SAPO_TEST_KILL_AT="step:3",
                      SAPO_TEST_RUN_TAG=tag)
    assert killed.returncode == -9
    resumed = run_sapo(sapo_cache, ["train", f"resume={out}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout

    assert metric_rows(out) == metric_rows(reference)
    want, got = checkpoint_weights(reference), checkpoint_weights(out)
    assert all(torch.equal(want[k], got[k]) for k in want)
    deadline = time.monotonic() + 10  # the orphaned sampler notices its trainer is gone within a second
    while _tagged(tag) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _tagged(tag)
