"""Bad training data through `sapo train dataset=FILE.jsonl prompt_field=... answer_field=...`.

Defined behaviour: a malformed line, a row missing a field and an empty file each stop the run
with exit 2 and a message naming the file and line; prompts longer than max_prompt_length are
skipped, warned about and counted in every metrics row (data/skipped/...); empty completions and
groups whose rewards are all equal train without NaN (zero advantage, zero update).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sapo.checkpoint import list_checkpoints
from tests.reliability.conftest import TINY, USER, cli

GOOD = [{"q": f"{a}+{b}=\n", "a": a + b} for a in range(1, 5) for b in range(1, 4)]


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _train(path: Path, out: Path, *extra: str) -> int:
    return cli(["train", *TINY, "max_steps=2", "eval_steps=0", f"output_dir={out}", f"dataset={path}",
                "prompt_field=q", "answer_field=a", *extra])


@pytest.mark.parametrize(("lines", "message"), [
    ([json.dumps(GOOD[0]), json.dumps(GOOD[1]), '{"q": "1+1=", "a": 2', json.dumps(GOOD[2])],
     "line 3: malformed JSON"),
    ([json.dumps(GOOD[0]), json.dumps({"q": "2+2=\n"}), json.dumps(GOOD[2])],
     "line 2: missing field 'a' (fields in this row: q)"),
    ([json.dumps({"question": "1+1=", "solution": 2})] * 3,
     "line 1: missing field 'q' (fields in this row: question, solution)"),
    ([], "is empty"),
    (["", "   "], "is empty"),
    (["[1, 2]"], "line 1: row is a JSON list, expected an object"),
    ([json.dumps({"q": "", "a": 1})], "line 1: prompt is empty"),
])
def test_bad_rows_stop_with_file_and_line(lines, message, sapo_cache, tmp_path, capsys):
    path = _write(tmp_path / "data.jsonl", lines)
    assert _train(path, tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "config error" in err and str(path) in err and message in err
    assert not list_checkpoints(tmp_path / "run")


def test_missing_file_and_missing_fields_are_config_errors(sapo_cache, tmp_path, capsys):
    assert _train(tmp_path / "nope.jsonl", tmp_path / "run") == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli(["train", f"dataset={tmp_path / 'x.jsonl'}", f"output_dir={tmp_path / 'run2'}"]) == 2
    assert "set prompt_field=... and answer_field=..." in capsys.readouterr().err
    assert not (tmp_path / "run2").exists()


def test_too_long_prompts_are_skipped_and_counted(sapo_cache, tmp_path, recwarn):
    long_rows = [{"q": "1+" * 30 + "1=\n", "a": 31}] * 3
    path = _write(tmp_path / "data.jsonl", [json.dumps(r) for r in GOOD + long_rows])
    out = tmp_path / "run"
    assert _train(path, out, "max_prompt_length=100") == 0
    assert any("skipped 3 training and 0 evaluation prompts longer than max_prompt_length=100" in str(w.message)
               for w in recwarn)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["data/skipped/prompt_too_long/train"] for r in rows] == [3.0, 3.0]
    # every prompt too long: nothing to train on is an error, not an empty loop
    assert _train(path, tmp_path / "run2", "max_prompt_length=4") == 2


@pytest.mark.parametrize("drop", ["false", "true"])
def test_all_equal_rewards_give_zero_advantage_and_no_weight_change(drop, sapo_cache, tmp_path):
    path = _write(tmp_path / "data.jsonl", [json.dumps(r) for r in GOOD])
    out = tmp_path / "run"
    assert _train(path, out, f"rewards=[{USER}:constant_reward]", "save_steps=1", "keep_checkpoints=5",
                  f"drop_equal_groups={drop}") == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["groups/equal_reward_frac"] == 1.0 and row["advantage/abs_mean"] == 0.0
        assert row["nonfinite/skipped_total"] == 0.0
        assert ("loss/total" in row) == (drop == "false")  # dropped groups: no update at all
    (_, first), (_, second) = list_checkpoints(out)
    a, b = (torch.load(p / "model.pt", weights_only=True) for p in (first, second))
    assert all(torch.equal(a[k], b[k]) for k in a)
