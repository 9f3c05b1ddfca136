"""Nothing lost, nothing run: the output_dir lock, resume that means what it says, damaged
checkpoints, unusable disks, final_model/ rebuilt, and the smaller traps of a careless user.

One finished 2-step run (module fixture) is copied for each test that changes it.
"""

from __future__ import annotations

import errno
import json
import pathlib
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from sapo import checkpoint as ckpt
from sapo import storage
from sapo.runlock import RunLock
from tests.reliability.conftest import REPO, TINY, USER, cli, sapo_env

RUN = [*TINY, "max_steps=2", "save_steps=1", "keep_checkpoints=2", "eval_steps=0"]


@pytest.fixture(scope="module")
def finished_run(sapo_cache, tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert cli(["train", *RUN, f"output_dir={out}"]) == 0
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path) -> pathlib.Path:
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def _final_weights(path: pathlib.Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _one_line(err: str, start: str) -> None:
    """The error is the last line of stderr, one line, no traceback (a model load's progress bar may precede it)."""
    last = err.rstrip("\n").rsplit("\n", 1)[-1].rsplit("\r", 1)[-1]
    assert last.startswith(start) and err.endswith("\n") and "Traceback" not in err, err
    assert sum(line.startswith("sapo ") for line in err.splitlines()) == 1, err


# -- 1. one run per output_dir ----------------------------------------------------------------


def test_a_second_run_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from sapo.runlock import RunLock; RunLock(sys.argv[1]).acquire(); "
         "print('held', flush=True); time.sleep(120)", str(out)],
        cwd=REPO, env=sapo_env(tmp_path), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert cli(["train", *RUN, f"output_dir={out}"]) == 2
        err = capsys.readouterr().err
        _one_line(err, "sapo train: config error: ")
        assert f"output_dir={out} is in use by another sapo run (pid {holder.pid} on host" in err
        assert sorted(p.name for p in out.iterdir()) == ["sapo.lock"]  # nothing written, nothing mixed
    finally:
        holder.kill()  # SIGKILL: the holder cannot clean up its lock file
        holder.wait()
    lock = RunLock(out).acquire()
    try:
        assert lock.taken_over["pid"] == holder.pid
        assert f"taking over {out / 'sapo.lock'} from a run that no longer holds it (pid {holder.pid}" in \
            capsys.readouterr().err
        with pytest.raises(Exception, match=rf"in use by another sapo run \(pid {__import__('os').getpid()}"):
            RunLock(out).acquire()
    finally:
        lock.release()
    assert not (out / "sapo.lock").exists()


# -- 2. --config with resume= obeys the resume rule -------------------------------------------


def test_config_file_with_resume_obeys_the_same_rule_as_the_command_line(finished_run, tmp_path, capsys):
    bad = tmp_path / "changed.yaml"
    bad.write_text("optim:\n  lr: 0.5\nloss_type: grpo\nnum_generations: 8\nmax_steps: 2\n")
    assert cli(["train", "--config", str(bad), f"resume={finished_run}"]) == 2
    err = capsys.readouterr().err
    _one_line(err, "sapo train: config error: ")
    assert "cannot change on resume: loss_type, lr, num_generations" in err
    # the run's own values again (as when the same config file is passed back) are not changes
    saved = (finished_run / "config.yaml").read_text()
    same = tmp_path / "same.yaml"
    same.write_text(saved)
    assert cli(["train", "--config", str(same), f"resume={finished_run}"]) == 0
    assert "already finished at step 2" in capsys.readouterr().out


def test_config_file_max_steps_applies_on_resume(run_copy, tmp_path, capsys):
    more = tmp_path / "more.yaml"
    more.write_text(f"max_steps: 3\nresume: {run_copy}\n")
    assert cli(["train", "--config", str(more)]) == 0
    assert "resuming" in capsys.readouterr().out
    rows = [json.loads(line) for line in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [s for s, _ in ckpt.list_checkpoints(run_copy)] == [2, 3]


# -- 3. a damaged latest checkpoint -------------------------------------------------------------


def test_damaged_latest_checkpoint_falls_back_and_ends_bit_identical(run_copy, capsys):
    original = torch.load(run_copy / "checkpoint-000002" / "model.pt", weights_only=True)
    model_pt = run_copy / "checkpoint-000002" / "model.pt"
    model_pt.write_bytes(model_pt.read_bytes()[:1000])  # truncated
    shutil.rmtree(run_copy / "final_model")
    (run_copy / "checkpoint-000002" / ckpt.COMPLETE_MARKER).touch()
    with pytest.warns(UserWarning, match=r"checkpoint-000002 is damaged: model.pt is truncated \(1000 of \d+ bytes\) "
                                         r"\(moved aside to checkpoint-000002.damaged\); resuming from checkpoint-000001"):
        assert cli(["train", f"resume={run_copy}"]) == 0
    assert "resuming" in capsys.readouterr().out
    redone = torch.load(run_copy / "checkpoint-000002" / "model.pt", weights_only=True)
    assert redone.keys() == original.keys() and all(torch.equal(redone[k], original[k]) for k in redone)
    assert (run_copy / "final_model" / "config.json").is_file()


# -- 4. storage ---------------------------------------------------------------------------------


def test_unusable_output_dirs_are_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SAPO_CACHE", str(tmp_path / "cache"))
    a_file = tmp_path / "file"
    a_file.write_text("x")
    real_mkdir = pathlib.Path.mkdir

    def read_only(self, *a, **kw):
        if self.name == "ro":
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *a, **kw)

    monkeypatch.setattr(pathlib.Path, "mkdir", read_only)
    for out, cause in ((a_file, "a file with that name exists where a directory is needed"),
                       (a_file / "run", "a part of the path is a file, not a directory"),
                       (tmp_path / "ro", "the file system is read-only")):
        assert cli(["train", *RUN, f"output_dir={out}"]) == 2
        err = capsys.readouterr().err
        _one_line(err, f"sapo train: storage error: output_dir={out}: cannot create it: ")
        assert cause in err
    assert not (tmp_path / "cache").exists()  # refused before any model was built


def test_disk_full_mid_run_is_one_line_and_keeps_what_was_written(run_copy, monkeypatch, capsys):
    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(storage, "_open_for_write", full)
    assert cli(["train", f"resume={run_copy}", "max_steps=3", "keep_checkpoints=1"]) == 2
    err = capsys.readouterr().err
    _one_line(err, "sapo train: storage error: disk full: cannot write checkpoint-000003: ")
    assert "no space left on the device; checkpoint-000002 is intact, nothing was lost" in err
    assert "free some space" in err and f"then: sapo train resume={run_copy}" in err
    assert [s for s, _ in ckpt.list_checkpoints(run_copy)] == [2]  # made room: keep_checkpoints=1 kept the newest
    assert ckpt.verify_checkpoint(run_copy / "checkpoint-000002") is None
    assert not list(run_copy.glob("*.tmp")) and not (run_copy / "sapo.lock").exists()


def test_disk_full_outside_checkpoints_is_one_line_too(run_copy, monkeypatch, capsys):
    """metrics.jsonl (a plain OSError) and final_model/ (safetensors folds the errno into its message)."""
    from sapo.tracking import RunLogger
    from sapo.training.policy import Policy

    def full_log(self, step, metrics):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(RunLogger, "log", full_log)
    assert cli(["train", f"resume={run_copy}", "max_steps=3"]) == 2
    err = capsys.readouterr().err
    _one_line(err, f"sapo train: storage error: writing into {run_copy}: no space left on the device; "
              f"checkpoint-000002 is intact: after fixing this, sapo train resume={run_copy}")
    monkeypatch.undo()

    def full_final(self, path, state_dict=None):
        (pathlib.Path(path) / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(Policy, "save_final", full_final)
    shutil.rmtree(run_copy / "final_model")
    assert cli(["train", f"resume={run_copy}"]) == 2
    _one_line(capsys.readouterr().err, "sapo train: storage error: ")
    assert not (run_copy / "final_model").exists() and not (run_copy / "final_model.tmp").exists()
    monkeypatch.undo()
    assert cli(["train", f"resume={run_copy}"]) == 0  # space freed: the model is rebuilt
    assert (run_copy / "final_model" / "config.json").is_file()


# -- 5. final_model/ and eval of a checkpoint ------------------------------------------------------


@pytest.mark.parametrize("damage", ["missing", "partial"])
def test_finished_run_rebuilds_a_missing_or_partial_final_model(damage, finished_run, run_copy, capsys):
    final = run_copy / "final_model"
    if damage == "missing":
        shutil.rmtree(final)
    else:  # killed while writing: final_model.tmp half-written, final_model/ not yet renamed
        final.rename(run_copy / "final_model.tmp")
        for f in (run_copy / "final_model.tmp").glob("*.safetensors"):
            f.write_bytes(f.read_bytes()[:100])
    assert cli(["train", f"resume={run_copy}"]) == 0
    out = capsys.readouterr().out
    assert f"finished at step 2, but final_model/ is {damage}" in out and "rebuilding it from checkpoint-000002" in out
    got, want = _final_weights(final), _final_weights(finished_run / "final_model")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert not (run_copy / "final_model.tmp").exists()
    assert cli(["train", f"resume={run_copy}"]) == 0
    assert "already finished at step 2" in capsys.readouterr().out


def test_eval_reads_a_checkpoint_folder(finished_run, capsys):
    code = cli(["eval", f"model={finished_run / 'checkpoint-000002'}", "eval_num_problems=4", "eval_num_samples=2",
                "eval_pass_k=[1,2]", "max_completion_length=24", "progress=false"])
    assert code == 0
    captured = capsys.readouterr()
    assert "| builtin | 4 |" in captured.out and "exporting" in captured.err


# -- 6. resume runs no code the user did not name ----------------------------------------------


def _evil_reward(tmp_path: pathlib.Path) -> tuple[str, pathlib.Path]:
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.py"
    path.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
                    "def fn(p, c, a):\n    return [0.0] * len(c)\n")
    return f"{path}:fn", marker


def test_resume_imports_no_reward_code_named_only_in_the_saved_config(run_copy, tmp_path, capsys):
    spec, marker = _evil_reward(tmp_path)
    config = run_copy / "config.yaml"
    config.write_text(config.read_text().replace("rewards:\n- math\n", f"rewards:\n- math\n- {spec}\n"))
    assert spec in config.read_text()
    # finished, final_model/ present: nothing to do, nothing imported
    assert cli(["train", f"resume={run_copy}"]) == 0 and not marker.exists()
    # finished, final_model/ missing: rebuilt from the checkpoint, still nothing imported
    shutil.rmtree(run_copy / "final_model")
    assert cli(["train", f"resume={run_copy}"]) == 0 and not marker.exists()
    capsys.readouterr()
    # more steps to train: refused until the code is named on this command line
    assert cli(["train", f"resume={run_copy}", "max_steps=3"]) == 2
    err = capsys.readouterr().err
    _one_line(err, "sapo train: config error: ")
    assert f"names reward code that would be imported and run: {spec}" in err and "trust_saved_rewards=true" in err
    assert not marker.exists()
    from sapo.config import build_config
    from sapo.resume import resolve_resume

    for given in ({"trust_saved_rewards": "true"}, {"rewards": f"[math,{spec}]"}):
        marker.unlink(missing_ok=True)
        cfg, checkpoint = resolve_resume(build_config(overrides={"resume": str(run_copy)}),
                                         {"resume": str(run_copy), **given})
        assert marker.exists() and cfg.rewards == ["math", spec] and checkpoint.name == "checkpoint-000002"


# -- 7. the smaller items -------------------------------------------------------------------------


def test_empty_output_dir_is_a_config_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli(["train", "output_dir="]) == 2
    _one_line(capsys.readouterr().err, "sapo train: config error: output_dir is empty")
    assert list(tmp_path.iterdir()) == []


def test_a_reward_that_changes_its_input_lists_changes_nothing_else():
    from sapo.rewards.runner import RewardRunner

    def greedy(prompts, completions, answers):
        completions.clear()  # a careless user function
        return []

    def count(prompts, completions, answers):
        return [float(len(c)) for c in completions]

    completions = ["a", "bb", "ccc"]
    out = RewardRunner([greedy, count])(["p"] * 3, completions, ["x"] * 3)
    assert completions == ["a", "bb", "ccc"] and out.total == [1.0, 2.0, 3.0]
    assert out.metrics["reward/errors/greedy"] == 1.0  # its own bad return value is counted, as before


def test_rewards_that_all_fail_stop_the_run():
    from sapo.rewards.runner import RewardError, RewardRunner

    state = {"ok": True}

    def flaky(prompts, completions, answers):
        if not state["ok"]:
            raise RuntimeError("down")
        return [1.0] * len(completions)

    runner = RewardRunner([flaky], max_failed_batches=3)
    runner(["p"], ["c"], ["a"])
    state["ok"] = False
    runner(["p"], ["c"], ["a"]), runner(["p"], ["c"], ["a"])  # worked before: tolerated twice
    with pytest.raises(RewardError, match="every reward function failed on 3 batches in a row"):
        runner(["p"], ["c"], ["a"])
    with pytest.raises(RewardError, match="on every batch so far"):  # never worked: stops at once
        RewardRunner([flaky], max_failed_batches=3)(["p"], ["c"], ["a"])


def test_a_run_whose_only_reward_always_raises_exits_2(sapo_cache, tmp_path, capsys):
    out = tmp_path / "run"
    with warnings.catch_warnings():
        code = cli(["train", *RUN, f"output_dir={out}", f"rewards=[{USER}:raising_reward]"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("sapo train: reward error: every reward function failed on every batch so far "
                          "(raising_reward: 1 errors, 0 timeouts")
    assert ckpt.list_checkpoints(out) == [] and not (out / "sapo.lock").exists()


def test_unknown_lora_target_is_a_config_error(sapo_cache, tmp_path, capsys):
    assert cli(["train", *RUN, f"output_dir={tmp_path / 'run'}", "lora_rank=4",
                "lora_target_modules=[q_proj,nonexistent]"]) == 2
    err = capsys.readouterr().err
    _one_line(err, "sapo train: config error: model='builtin:arith-moe': lora_target_modules ['nonexistent'] "
              "match no module of")
    assert "its linear layers are named [" in err and "'q_proj'" in err


def test_data_errors_come_before_the_model_with_the_real_key(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SAPO_CACHE", str(tmp_path / "cache"))  # a model build would create it
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"q": "1+1=", "a": None}) + "\n")
    assert cli(["train", *RUN, f"output_dir={tmp_path / 'run'}", f"dataset={data}", "prompt_field=q",
                "answer_field=a"]) == 2
    err = capsys.readouterr().err
    _one_line(err, "sapo train: config error: ")
    assert f"{data}: line 1: field 'a' is null" in err and "data_on_error=skip" in err
    assert not (tmp_path / "cache").exists()
