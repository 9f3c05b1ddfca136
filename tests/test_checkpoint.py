import json

import pytest
import torch

from sapo import checkpoint as ckpt


def _setup():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    sched.step()
    return model, opt, sched


def test_roundtrip_restores_weights_optimizer_rng(tmp_path):
    model, opt, sched = _setup()
    gen = torch.Generator().manual_seed(5)
    path = ckpt.save_checkpoint(tmp_path, 3, model=model, optimizer=opt, scheduler=sched,
                                trainer_state={"data": {"epoch": 1, "index": 7}}, generators={"g": gen})
    expected_draw = torch.rand(3, generator=gen)
    expected_global = torch.rand(2)
    model2, opt2, sched2 = _setup()
    gen2 = torch.Generator().manual_seed(99)
    state = ckpt.load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2, generators={"g": gen2})
    assert state["step"] == 3 and state["data"] == {"epoch": 1, "index": 7}
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(torch.rand(3, generator=gen2), expected_draw)
    assert torch.equal(torch.rand(2), expected_global)
    assert opt2.state_dict()["state"][0]["exp_avg"].equal(opt.state_dict()["state"][0]["exp_avg"])


def test_partial_checkpoint_is_ignored_and_pruned(tmp_path):
    model, opt, sched = _setup()
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, model=model, optimizer=opt, scheduler=sched, trainer_state={}, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 3]
    # a write killed half-way: a .tmp folder, and a folder without the COMPLETE marker
    (tmp_path / "checkpoint-000004.tmp").mkdir()
    broken = tmp_path / "checkpoint-000005"
    broken.mkdir()
    (broken / "trainer_state.json").write_text(json.dumps({"step": 5}))
    assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint-000003"
    ckpt.prune_checkpoints(tmp_path, keep=2)
    assert not (tmp_path / "checkpoint-000004.tmp").exists()


def test_atomic_folder_replaces_whole_or_not_at_all(tmp_path):
    from sapo.checkpoint import atomic_folder

    target = tmp_path / "final_model"
    with atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("one")
    assert (target / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError, match="boom"), atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("boom")
    assert (target / "a.txt").read_text() == "one"  # the failed write left the old folder as it was
    with atomic_folder(target) as tmp:
        (tmp / "b.txt").write_text("two")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]  # replaced as a whole, nothing merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final_model"]  # no .tmp / .old left behind
