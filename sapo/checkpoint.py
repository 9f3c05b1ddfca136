"""Atomic training checkpoints.

A checkpoint is a folder `checkpoint-<step>` written as `checkpoint-<step>.tmp` and renamed only
once every file is on disk, so a run killed mid-write leaves the previous checkpoint intact and
the partial folder is ignored (and cleaned up) on resume. It holds everything needed to continue
exactly: trainable weights, optimizer, scheduler, every RNG state, the data position and step.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

_NAME = re.compile(r"^checkpoint-(\d+)$")
COMPLETE_MARKER = "COMPLETE"
KILL_ENV = "SAPO_TEST_KILL_AT"


class NonFiniteError(RuntimeError):
    """Training produced NaN/inf (too many skipped updates, or weights that must not be saved)."""


EXIT_NONFINITE = 3  # `sapo train`'s exit code when it stops on NonFiniteError (1 stays "crashed")


def kill_point_for_tests(where: str, step: int) -> None:
    """Crash-safety test hook: with SAPO_TEST_KILL_AT=<where>:<step>, SIGKILL this process here.

    where is "step" (mid-update, after the step's first optimizer update) or "checkpoint" (after
    part of the checkpoint's files are written). Unset in normal runs: one dict lookup.
    """
    if os.environ.get(KILL_ENV) == f"{where}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield `<path>.tmp` to write a folder into; on success it replaces `path` by renames, so a
    reader (or a crash) never sees a half-written folder: `path` holds the old content or the new.
    On an error the temporary folder is removed and `path` is left as it was."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(tmp)
    old = path.with_name(path.name + ".old")
    if path.exists():  # a directory cannot be renamed onto a non-empty one: move the old one aside
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for key, gen in (generators or {}).items():
        if key in state["generators"]:
            gen.set_state(state["generators"][key])


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Only what training changes (all weights for full fine-tuning, adapters for LoRA)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in names}


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
    generators: dict[str, torch.Generator] | None = None,
    keep: int = 2,
    full_state: tuple[dict, dict] | None = None,
) -> Path:
    """Write checkpoint-<step> atomically and prune older ones beyond `keep`.

    full_state: (weights, optimizer state) already gathered from a sharded model
    (sapo.distributed.full_state), saved instead of model's and optimizer's own state dicts.
    Refuses (NonFiniteError, nothing written) when a weight is NaN/inf: a checkpoint is always clean.
    """
    output_dir = Path(output_dir)
    weights = full_state[0] if full_state is not None else trainable_state_dict(model)
    bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise NonFiniteError(f"not saving checkpoint-{step:06d}: non-finite weights in {', '.join(bad[:5])}; "
                             "the previous checkpoint is intact")
    final = output_dir / f"checkpoint-{step:06d}"
    with atomic_folder(final) as tmp:  # checkpoint-<step>.tmp; re-saving the same step replaces it
        torch.save(weights, tmp / "model.pt")
        torch.save(full_state[1] if full_state is not None else optimizer.state_dict(), tmp / "optimizer.pt")
        kill_point_for_tests("checkpoint", step)
        torch.save(scheduler.state_dict() if scheduler is not None else {}, tmp / "scheduler.pt")
        torch.save(rng_state(generators), tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=1))
        (tmp / COMPLETE_MARKER).write_text("ok\n")
    prune_checkpoints(output_dir, keep)
    return final


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / COMPLETE_MARKER).exists():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def prune_checkpoints(output_dir: str | Path, keep: int) -> None:
    output_dir = Path(output_dir)
    for p in output_dir.glob("checkpoint-*.tmp"):
        shutil.rmtree(p, ignore_errors=True)
    found = list_checkpoints(output_dir)
    for _, path in found[: max(0, len(found) - keep)]:
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    generators: dict[str, torch.Generator] | None = None,
    load_full_state: Any = None,
) -> dict[str, Any]:
    """Restore everything saved by save_checkpoint; returns the trainer state (step, data position...).

    load_full_state(weights, optimizer_state): how a sharded model takes the full state
    (sapo.distributed.load_full_state); by default model and optimizer load their state dicts.
    """
    path = Path(path)
    weights = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    optimizer_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    if load_full_state is not None:
        load_full_state(weights, optimizer_state)
    else:
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected:
            raise RuntimeError(f"checkpoint {path} has weights the model does not: {unexpected[:5]}")
        optimizer.load_state_dict(optimizer_state)
    if scheduler is not None:
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
    set_rng_state(torch.load(path / "rng.pt", map_location="cpu", weights_only=False), generators)
    return read_trainer_state(path)


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    """The step, data position and counters of a checkpoint, without loading any tensor."""
    return json.loads((Path(path) / "trainer_state.json").read_text())
