"""Atomic, verifiable training checkpoints.

A checkpoint is a folder `checkpoint-<step>` written as `checkpoint-<step>.tmp` and renamed only
once every file is on disk, so a run killed mid-write leaves the previous checkpoint intact and
the partial folder is ignored (and cleaned up) on resume. It holds everything needed to continue
exactly: trainable weights, optimizer, scheduler, every RNG state, the data position and step.

`manifest.json` lists each file's size and SHA-256 (hashed while it was written); the `COMPLETE`
marker, written last, holds the manifest's own SHA-256. `verify_checkpoint` checks both, so a file
deleted, emptied, truncated or altered after the save is found before anything is loaded.
Nothing is unpickled beyond tensors and plain containers: every `torch.load` is `weights_only=True`
(RNG states are stored as tensors and lists, not as pickled NumPy objects).
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

from sapo.storage import (
    DISK_FULL,
    StorageError,
    describe_os_error,
    free_bytes,
    save_tensors,
    sha256_of,
    write_file,
)

_NAME = re.compile(r"^checkpoint-(\d+)$")
COMPLETE_MARKER = "COMPLETE"
MANIFEST = "manifest.json"
LEGACY_MARKER = "ok"  # COMPLETE of checkpoints written before manifests
FILES = ("model.pt", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json")
KILL_ENV = "SAPO_TEST_KILL_AT"


class NonFiniteError(RuntimeError):
    """Training produced NaN/inf (too many skipped updates, or weights that must not be saved)."""


EXIT_NONFINITE = 3  # `sapo train`'s exit code when it stops on NonFiniteError (1 stays "crashed")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


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


# ---------------------------------------------------------------------------------------------
# RNG states as tensors and plain lists (loadable with weights_only=True)


def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    py = state["python"]
    if isinstance(py, dict):
        random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss"]))
    else:  # legacy: random.getstate()'s tuple
        random.setstate((py[0], tuple(py[1]), py[2]))
    npy = state["numpy"]
    if isinstance(npy, dict):
        np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                             npy["cached_gaussian"]))
    else:  # legacy: np.random.get_state()'s tuple
        np.random.set_state(npy)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for key, gen in (generators or {}).items():
        if key in state["generators"]:
            gen.set_state(state["generators"][key])


def _load_rng(path: Path) -> dict[str, Any]:
    """rng.pt with weights_only=True; checkpoints from before the tensor layout pickled NumPy's state,
    whose array reconstruction is the one non-tensor global allowed (it runs no user code)."""
    legacy = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    with torch.serialization.safe_globals(legacy):
        return torch.load(path, map_location="cpu", weights_only=True)


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Only what training changes (all weights for full fine-tuning, adapters for LoRA)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in names}


# ---------------------------------------------------------------------------------------------
# Save


def _write_checkpoint(final: Path, step: int, contents: dict[str, Any]) -> None:
    """Every file through storage.write_file (sized and hashed as written), then the manifest, then
    COMPLETE holding the manifest's hash; the folder appears under its final name only at the end."""
    with atomic_folder(final) as tmp:  # checkpoint-<step>.tmp; re-saving the same step replaces it
        files = {}
        for name, obj in contents.items():
            if name == "scheduler.pt":
                kill_point_for_tests("checkpoint", step)  # after model.pt and optimizer.pt
            written = (write_file(tmp / name, json.dumps(obj, indent=1)) if name.endswith(".json")
                       else save_tensors(obj, tmp / name))
            files[name] = {"size": written.size, "sha256": written.sha256}
        manifest = json.dumps({"format": 1, "step": step, "files": files}, indent=1)
        written = write_file(tmp / MANIFEST, manifest)
        write_file(tmp / COMPLETE_MARKER, written.sha256 + "\n")


def _checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def make_room(output_dir: Path, keep: int) -> list[str]:
    """Disk full while saving: delete what the save would delete anyway once it succeeded (stale
    temporary folders, and complete checkpoints beyond the newest keep - 1), never the newest one.
    Returns the names removed."""
    removed = []
    for p in sorted(output_dir.glob("checkpoint-*.tmp")):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    found = list_checkpoints(output_dir)
    for _, path in found[: max(0, len(found) - max(1, keep - 1))]:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    return removed


def _storage_error(err: OSError, output_dir: Path, final: Path) -> StorageError:
    newest = latest_checkpoint(output_dir)
    kept = (f"{newest.name} is intact, nothing was lost" if newest is not None else "no checkpoint was written yet")
    if err.errno not in DISK_FULL:
        return StorageError(f"cannot write {final.name}: {describe_os_error(err)}; {kept}", err.errno)
    need = _checkpoint_bytes(newest) if newest is not None else None
    free = free_bytes(output_dir)
    sizes = (f" (a checkpoint takes about {need / 2**20:.0f} MiB; {free / 2**20:.0f} MiB free)"
             if need is not None and free is not None else "")
    how = "free some space" + sizes + (
        ", or resume with keep_checkpoints=1 to keep only the newest checkpoint"
        if len(list_checkpoints(output_dir)) > 1 else
        " (a save needs room for one more checkpoint: the newest is never deleted before the next is complete)")
    return StorageError(f"disk full: cannot write {final.name}: {describe_os_error(err)}; {kept}. To continue, "
                        f"{how}, then: sapo train resume={output_dir}", err.errno)


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
    extra: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Write checkpoint-<step> atomically and prune older ones beyond `keep`.

    extra: more tensor files, {name: nested dicts of tensors} saved as `<name>.pt` (e.g. the older weight
    versions a lagging sampler needs), covered by the manifest like the rest; read with `load_extra`.
    full_state: (weights, optimizer state) already gathered from a sharded model
    (sapo.distributed.full_state), saved instead of model's and optimizer's own state dicts.
    Refuses (NonFiniteError, nothing written) when a weight is NaN/inf: a checkpoint is always clean.
    A full disk: the older checkpoints the save would prune afterwards are removed first and the
    save is tried once more; any storage failure raises StorageError (one line: the path, the
    cause, the newest intact checkpoint and what to do), never leaving a partial folder.
    """
    output_dir = Path(output_dir)
    weights = full_state[0] if full_state is not None else trainable_state_dict(model)
    bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise NonFiniteError(f"not saving checkpoint-{step:06d}: non-finite weights in {', '.join(bad[:5])}; "
                             "the previous checkpoint is intact")
    final = output_dir / f"checkpoint-{step:06d}"
    contents = {
        "model.pt": weights,
        "optimizer.pt": full_state[1] if full_state is not None else optimizer.state_dict(),
        "scheduler.pt": scheduler.state_dict() if scheduler is not None else {},
        "rng.pt": rng_state(generators),
        "trainer_state.json": {"step": step, **trainer_state},
    }
    for name, value in (extra or {}).items():
        if f"{name}.pt" in contents or not name.replace("_", "").isalnum():
            raise ValueError(f"extra checkpoint file name {name!r}: use letters, digits and '_', not a built-in name")
        contents[f"{name}.pt"] = value
    try:
        _write_checkpoint(final, step, contents)
    except OSError as err:
        if err.errno not in DISK_FULL:
            raise _storage_error(err, output_dir, final) from None
        removed = make_room(output_dir, keep)
        if not removed:
            raise _storage_error(err, output_dir, final) from None
        print(f"[sapo] disk full writing {final.name}: removed {', '.join(removed)} first "
              f"(keep_checkpoints={keep}) and trying again", flush=True)
        try:
            _write_checkpoint(final, step, contents)
        except OSError as err2:
            raise _storage_error(err2, output_dir, final) from None
    prune_checkpoints(output_dir, keep)
    return final


# ---------------------------------------------------------------------------------------------
# Find, verify, load


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (with a COMPLETE marker; not yet verified), oldest first."""
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


def _size_problem(name: str, size: int, expected: int) -> str:
    if size == 0:
        return f"{name} is empty (0 of {expected} bytes)"
    if size < expected:
        return f"{name} is truncated ({size} of {expected} bytes)"
    return f"{name} is larger than when it was saved ({size}, saved {expected} bytes)"


def verify_checkpoint(path: str | Path) -> str | None:
    """None when the checkpoint is intact, else what is wrong with it (one phrase naming the file).

    Reads every file once to hash it. Checkpoints written before manifests (COMPLETE = "ok") are
    checked for presence and non-emptiness of each file, and a trainer_state.json that parses."""
    path = Path(path)
    marker = path / COMPLETE_MARKER
    if not marker.is_file():
        return f"{COMPLETE_MARKER} is missing (the save did not finish)"
    try:
        marker_text = marker.read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        return f"{COMPLETE_MARKER} cannot be read ({err})"
    manifest_path = path / MANIFEST
    if marker_text == LEGACY_MARKER and not manifest_path.exists():
        for name in FILES:
            if not (path / name).is_file():
                return f"{name} is missing"
            if (path / name).stat().st_size == 0:
                return f"{name} is empty"
        return _trainer_state_problem(path)
    if not manifest_path.is_file():
        return f"{MANIFEST} is missing"
    if sha256_of(manifest_path) != marker_text:
        return f"{MANIFEST} is damaged (its SHA-256 differs from the one in {COMPLETE_MARKER})"
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST} cannot be read ({err})"
    for name in FILES:
        if name not in files:
            return f"{MANIFEST} does not list {name}"
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        size = f.stat().st_size
        if size != meta["size"]:
            return _size_problem(name, size, meta["size"])
        if sha256_of(f) != meta["sha256"]:
            return f"{name} is corrupted (its SHA-256 differs from the manifest's)"
    return None


def _trainer_state_problem(path: Path) -> str | None:
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError) as err:
        return f"trainer_state.json cannot be read ({type(err).__name__}: {err})"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return "trainer_state.json has no step"
    return None


def set_aside(path: str | Path) -> Path:
    """Rename a damaged checkpoint to `<name>.damaged` (kept for inspection; never listed, resumed
    from or pruned). Returns the new path."""
    path = Path(path)
    target = path.with_name(path.name + ".damaged")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.damaged{n}")
    os.replace(path, target)
    return target


def _load(path: Path, what: str = "tensors") -> Any:
    try:
        return _load_rng(path) if what == "rng" else torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except Exception as err:  # EOFError, zip errors, UnpicklingError: all "this file is not a checkpoint file"
        raise CheckpointError(f"{path} cannot be loaded ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The trainable weights of a checkpoint (model.pt)."""
    return _load(Path(path) / "model.pt")


def load_extra(path: str | Path, name: str) -> Any:
    """An extra tensor file of a checkpoint (save_checkpoint's `extra`); CheckpointError if absent."""
    return _load(Path(path) / f"{name}.pt")


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
    A file that cannot be read raises CheckpointError naming it (verify_checkpoint finds damage
    before this is called).
    """
    path = Path(path)
    weights = load_weights(path)
    optimizer_state = _load(path / "optimizer.pt")
    if load_full_state is not None:
        load_full_state(weights, optimizer_state)
    else:
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected:
            raise CheckpointError(f"checkpoint {path} has weights the model does not: {unexpected[:5]}")
        optimizer.load_state_dict(optimizer_state)
    if scheduler is not None:
        scheduler.load_state_dict(_load(path / "scheduler.pt"))
    set_rng_state(_load(path / "rng.pt", "rng"), generators)
    return read_trainer_state(path)


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    """The step, data position and counters of a checkpoint, without loading any tensor."""
    file = Path(path) / "trainer_state.json"
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{file} cannot be read ({type(err).__name__}: {err})") from None

