"""`sapo eval` end to end on the tiny built-in model: the per-benchmark table and its metrics."""

import json

from sapo.cli import main


def test_sapo_eval_prints_a_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SAPO_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps({"q": f"{a}+{b}=\n", "a": str(a + b)}) + "\n" for a, b in [(1, 2), (3, 4), (5, 5)]))
    rc = main(["eval", "warmstart_steps=20", "train_size=100", "eval_num_samples=2", "eval_pass_k=[1,2]",
               "threads=1", "max_completion_length=16", f"eval_dataset=builtin:arith,{data}",
               "prompt_field=q", "answer_field=a", "template=plain", "eval_num_problems=6", "eval_temperatures=[0.5]"])
    captured = capsys.readouterr()
    out = captured.out
    assert rc == 0
    # progress: a bar per benchmark over its completions (6 problems x (2 samples + greedy + 2 at T = 0.5) = 30)
    assert "sapo eval builtin" in captured.err and "30/30" in captured.err
    assert "| benchmark | problems | Pass@1 (avg@n) | pass@2 | greedy | Pass@1 T=0.5 |" in out
    rows = [line for line in out.splitlines() if line.startswith("| builtin") or line.startswith(f"| {data}")]
    assert len(rows) == 2
    assert "| 6 |" in rows[0] and "| 3 |" in rows[1]
