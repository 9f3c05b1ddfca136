"""Damaged checkpoints and full or unusable disks, at the level of sapo.checkpoint (no model, ~1 s).

Each file of a checkpoint deleted, emptied, truncated or altered is found by verify_checkpoint
(the manifest's sizes and SHA-256), resume falls back to the newest intact checkpoint with a warning
naming the file, and with none intact `sapo train resume=DIR` exits 2 naming the path and what to
do. A full disk (simulated in-process: the writer raises OSError(ENOSPC), as a real one does) gives
one StorageError line, leaves no partial folder, and with keep_checkpoints > 1 makes room first.
"""

from __future__ import annotations

import errno
import io
import json
import random

import numpy as np
import pytest
import torch

from sapo import checkpoint as ckpt
from sapo import storage
from sapo.config import build_config, save_config
from sapo.resume import choose_checkpoint
from sapo.storage import StorageError


def _state():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return model, opt, sched


def _save(out, step, keep=10, **kw):
    model, opt, sched = _state()
    with torch.no_grad():
        model.weight.add_(step)  # each checkpoint different
    return ckpt.save_checkpoint(out, step, model=model, optimizer=opt, scheduler=sched,
                                trainer_state={"data": {"epoch": 0, "index": step}}, keep=keep, **kw)


DAMAGE = {
    "deleted": lambda p: p.unlink(),
    "emptied": lambda p: p.write_bytes(b""),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: max(1, p.stat().st_size // 2)]),
    "altered": lambda p: p.write_bytes(bytes([p.read_bytes()[0] ^ 1]) + p.read_bytes()[1:]),
}
EXPECTED = {"deleted": "is missing", "emptied": "is empty", "truncated": "is truncated", "altered": "is corrupted"}


@pytest.mark.parametrize("name", [*ckpt.FILES, ckpt.MANIFEST])
@pytest.mark.parametrize("how", list(DAMAGE))
def test_every_damaged_file_is_found_and_resume_falls_back(name, how, tmp_path):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    assert ckpt.verify_checkpoint(newest) is None
    DAMAGE[how](newest / name)
    problem = ckpt.verify_checkpoint(newest)
    assert problem is not None and name in problem
    if name != ckpt.MANIFEST:
        assert EXPECTED[how] in problem
    with pytest.warns(UserWarning, match=rf"checkpoint-000002 is damaged: {name}.*resuming from checkpoint-000001"):
        chosen = choose_checkpoint(tmp_path)
    assert chosen.name == "checkpoint-000001"
    # the damaged one is kept for inspection, out of the way of listing and pruning
    assert [p.name for _, p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-000001"]
    assert (tmp_path / "checkpoint-000002.damaged").is_dir()


def test_no_intact_checkpoint_exits_2_naming_the_path_and_what_to_do(tmp_path, capsys):
    from sapo.cli import main

    save_config(build_config(overrides={"output_dir": str(tmp_path)}), tmp_path / "config.yaml")
    for step in (1, 2):
        (_save(tmp_path, step) / "model.pt").write_bytes(b"")
    assert main(["train", f"resume={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"resume={tmp_path}: no intact checkpoint" in err
    assert "checkpoint-000002 is damaged: model.pt is empty" in err and "checkpoint-000001 is damaged" in err
    assert "Restore a checkpoint from a backup, or start the run over" in err
    # nothing was renamed: a second attempt says the same (it never restarts the run from step 0)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1, 2]
    assert main(["train", f"resume={tmp_path}"]) == 2
    assert "checkpoint-000002 is damaged: model.pt is empty" in capsys.readouterr().err


def test_rng_states_need_no_pickle(tmp_path):
    """rng.pt loads with weights_only=True and restores Python, NumPy, torch and generator streams."""
    gen = torch.Generator().manual_seed(3)
    random.seed(1), np.random.seed(2), torch.manual_seed(4)
    path = _save(tmp_path, 1, generators={"g": gen})
    want = (random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=gen))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    gen2 = torch.Generator().manual_seed(9)
    model, opt, sched = _state()
    ckpt.load_checkpoint(path, model=model, optimizer=opt, scheduler=sched, generators={"g": gen2})
    got = (random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=gen2))
    assert got[:2] == want[:2] and torch.equal(got[2], want[2]) and torch.equal(got[3], want[3])
    torch.load(path / "rng.pt", weights_only=True)  # no allow-list needed for the new layout


def test_no_weights_only_false_in_the_package():
    import pathlib

    import sapo

    root = pathlib.Path(sapo.__file__).parent
    offenders = [str(p) for p in root.rglob("*.py") if "weights_only=False" in p.read_text()]
    assert offenders == []


# -- storage ---------------------------------------------------------------------------------


class _FullDisk(io.FileIO):
    """A real file whose writes fail with ENOSPC once `budget` bytes are written (shared by all files)."""

    budget = [0]

    def write(self, data):
        if len(data) > self.budget[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.budget[0] -= len(data)
        return super().write(data)


def _disk_with(monkeypatch, budget: int):
    _FullDisk.budget = [budget]
    monkeypatch.setattr(storage, "_open_for_write", lambda path: _FullDisk(path, "w"))


def test_torch_short_write_reports_the_disk_error_not_unexpected_pos(tmp_path, monkeypatch):
    _disk_with(monkeypatch, 500)
    with pytest.raises(OSError) as info:
        storage.save_tensors({"w": torch.zeros(10_000)}, tmp_path / "x.pt")
    assert info.value.errno == errno.ENOSPC  # torch alone says "RuntimeError: ... unexpected pos"


def test_disk_full_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path, 1, keep=1)
    _disk_with(monkeypatch, 1000)
    with pytest.raises(StorageError) as info:
        _save(tmp_path, 2, keep=1)
    msg = str(info.value)
    assert "\n" not in msg and "disk full: cannot write checkpoint-000002" in msg
    assert "no space left on the device" in msg and "checkpoint-000001 is intact, nothing was lost" in msg
    assert "free some space" in msg and f"sapo train resume={tmp_path}" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000001"]  # no partial folder
    assert ckpt.verify_checkpoint(tmp_path / "checkpoint-000001") is None


def test_disk_full_makes_room_by_pruning_first(tmp_path, monkeypatch, capsys):
    for step in (1, 2, 3):
        _save(tmp_path, step, keep=3)
    size = ckpt._checkpoint_bytes(tmp_path / "checkpoint-000003")
    _disk_with(monkeypatch, 0)
    real_rmtree = ckpt.shutil.rmtree

    def freeing_rmtree(path, *a, **kw):  # deleting a checkpoint frees its bytes on the simulated disk
        if "checkpoint-" in str(path) and not str(path).endswith(".tmp"):
            _FullDisk.budget[0] += 2 * size
        return real_rmtree(path, *a, **kw)

    monkeypatch.setattr(ckpt.shutil, "rmtree", freeing_rmtree)
    _save(tmp_path, 4, keep=2)
    assert "disk full writing checkpoint-000004: removed checkpoint-000001, checkpoint-000002 first" in \
        capsys.readouterr().out
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3, 4]
    assert ckpt.verify_checkpoint(tmp_path / "checkpoint-000004") is None


@pytest.mark.parametrize(("code", "cause"), [(errno.EROFS, "the file system is read-only"),
                                             (errno.EACCES, "permission denied")])
def test_read_only_disk_is_one_line(code, cause, tmp_path, monkeypatch):
    _save(tmp_path, 1)

    def refuse(path):
        raise OSError(code, "nope", str(path))

    monkeypatch.setattr(storage, "_open_for_write", refuse)
    with pytest.raises(StorageError, match=rf"cannot write checkpoint-000002: .*model.pt: {cause}; "
                                           r"checkpoint-000001 is intact"):
        _save(tmp_path, 2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1]


def test_legacy_checkpoints_still_load(tmp_path):
    """Checkpoints written before manifests (COMPLETE = "ok", NumPy state pickled in rng.pt)."""
    path = _save(tmp_path, 1)
    (path / ckpt.MANIFEST).unlink()
    (path / ckpt.COMPLETE_MARKER).write_text("ok\n")
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "generators": {}}, path / "rng.pt")
    assert ckpt.verify_checkpoint(path) is None
    model, opt, sched = _state()
    assert ckpt.load_checkpoint(path, model=model, optimizer=opt, scheduler=sched)["step"] == 1
    (path / "optimizer.pt").write_bytes(b"")
    assert ckpt.verify_checkpoint(path) == "optimizer.pt is empty"
    (path / "optimizer.pt").write_bytes(b"garbage")
    with pytest.raises(ckpt.CheckpointError, match=r"optimizer.pt cannot be loaded"):
        ckpt.load_checkpoint(path, model=model, optimizer=opt, scheduler=sched)
    json.loads((path / "trainer_state.json").read_text())
