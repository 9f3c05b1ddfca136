"""Bad configuration fails before any work: exit code 2, one clear line on stderr, no model built
or loaded, no output file written.

SAPO_CACHE points at an empty folder: had `sapo train` gone as far as the model, it would have
started building the warm-started built-in model there.
"""

from __future__ import annotations

import pytest

from tests.reliability.conftest import cli, run_sapo

CASES = [
    (["lrr=0.1"], "unknown config key 'lrr'. Did you mean: lr"),
    (["num_generation=4"], "Did you mean: num_generations"),
    (["max_steps"], "expected key=value, got 'max_steps'"),
    (["max_steps=abc"], "max_steps must be an integer, got 'abc'"),
    (["max_steps=2.5"], "max_steps must be an integer, got '2.5'"),
    (["lr=fast"], "lr must be a number, got 'fast'"),
    (["lr=nan"], "lr must be a finite number"),
    (["progress=maybe"], "progress must be true or false"),
    (["eval_pass_k=[1,"], "eval_pass_k='[1,' is not a valid list"),
    (["eval_pass_k=[one]"], "eval_pass_k[0] must be an integer, got 'one'"),
    (["lr=0"], "lr must be > 0"),
    (["top_p=1.5"], "top_p must be in (0, 1]"),
    (["top_k=-1"], "top_k must be >= 0"),
    (["temperature=0"], "temperature must be > 0"),
    (["eval_temperature=0"], "eval_temperature must be > 0"),
    (["adam_beta2=1"], "adam_beta1 and adam_beta2 must be in [0, 1)"),
    (["max_steps=0"], "max_steps must be >= 1, got 0"),
    (["num_generations=1"], "num_generations must be >= 2"),
    (["reward_timeout=-1"], "reward_timeout must be > 0"),
    (["loss_type=ppo"], "loss_type='ppo' is not one of sapo, grpo"),
    (["prompts_per_step=3", "num_generations=3", "num_minibatches=2"],
     "the rollout batch (9 = prompts_per_step * num_generations) must divide into num_minibatches=2"),
    (["prompts_per_step=1", "num_generations=2", "num_minibatches=4"],
     "num_minibatches=4 is larger than the rollout batch (prompts_per_step * num_generations = 2)"),
    (["reward_weights=[1,2]"], "reward_weights has 2 entries but rewards has 1"),
    (["eval_num_samples=4", "eval_pass_k=[1,8]"], "eval_pass_k values must be in 1..eval_num_samples=4"),
    (["rewards=nosuch.module:fn"], "cannot import module 'nosuch.module'"),
    (["rewards=[math,lenght]"], "reward function 'lenght': use a built-in name"),
    (["dataset=data.jsonl"], "set prompt_field=... and answer_field=..."),
    (["--config", "missing.yaml"], "config file missing.yaml does not exist"),
    (["model=builtin:arith-dense", "routing_replay=R2"], "routing_replay=R2 needs a Mixture-of-Experts model; "
     "builtin:arith-dense is dense"),
    (["model=builtin:arith-dense", "loss_type=grpo_r2"], "loss_type=grpo_r2 replays MoE routing"),
]


@pytest.mark.parametrize(("args", "message"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_config_exits_2_before_any_work(args, message, tmp_path, monkeypatch, capsys):
    cache, out = tmp_path / "cache", tmp_path / "run"
    monkeypatch.setenv("SAPO_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    assert cli(["train", *args, f"output_dir={out}"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("sapo train: config error: ") and message in captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert not out.exists() and not cache.exists()


@pytest.mark.parametrize(("text", "message"), [
    ("lr: [unclosed", "is not valid YAML"),
    ("- a\n- b\n", "must hold a mapping of key: value"),
    ("optim:\n  lr: 0\n", "lr must be > 0"),  # nested groups are read, and validated
    ("optim:\n  lrate: 0.1\n", "unknown config key 'lrate'"),
])
def test_bad_yaml_file(text, message, tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    assert cli(["train", "--config", str(path), f"output_dir={tmp_path / 'run'}"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_real_process_exit_code_and_stderr(tmp_path):
    proc = run_sapo(tmp_path / "cache", ["train", "num_minibatchs=2", f"output_dir={tmp_path / 'run'}"], timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("sapo train: config error: unknown config key 'num_minibatchs'. "
                                   "Did you mean: num_minibatches?")
    assert proc.stdout == "" and not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
