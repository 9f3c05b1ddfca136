"""Objectives from installed packages: the `sapo.objectives` entry-point group.

Each test "installs" a package by writing a `NAME-0.1.dist-info` folder (METADATA, entry_points.txt) and its
module into a folder on the path, as pip would: importlib.metadata finds it there like any installed package.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest

from sapo.config import ConfigError, build_config, help_text
from sapo.objectives import loss_types, policy_loss, registry, resolve
from tests.reliability.conftest import REPO, TINY, run_sapo

GPG_MODULE = '''
"""GPG (Group Policy Gradient), an objective sapo does not ship: loss -A logp, no ratio, token mean."""
from sapo.objectives import register_objective, register_shaping


def policy_gradient(ratio, advantages, logprobs, spec):
    return -advantages * logprobs


def register():
    register_shaping("policy_gradient", policy_gradient, consumes=("logprobs",), ratio_levels=("token",))
    register_objective("gpg", ratio_level="token", shaping="policy_gradient", aggregation="token_mean")
'''


def install(root: Path, dist: str, entry_points: dict[str, str], modules: dict[str, str]) -> Path:
    """A package `dist` as pip installs it into site-packages: its modules and its dist-info metadata."""
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = "".join(f"{name} = {value}\n" for name, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[sapo.objectives]\n{lines}")
    for module, source in modules.items():
        (root / f"{module}.py").write_text(source)
    return root


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A site-packages-like folder on sys.path; the registry and the plug-in modules are restored afterwards."""
    monkeypatch.setattr(registry, "_OBJECTIVES", dict(registry._OBJECTIVES))
    monkeypatch.setattr(registry, "_SHAPINGS", dict(registry._SHAPINGS))
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    before = set(sys.modules)
    yield root
    for name in set(sys.modules) - before:
        if name.startswith("plug_"):
            del sys.modules[name]


def test_plugin_is_listed_without_import_and_loaded_when_asked_for(site):
    install(site, "gpg-objective", {"gpg": "plug_gpg:register"}, {"plug_gpg": GPG_MODULE})
    assert "gpg" in loss_types() and "gpg" in help_text()
    assert "plug_gpg" not in sys.modules  # listing reads metadata only
    cfg = build_config(overrides={"loss_type": "gpg"})  # validation loads it: errors before any model loads
    assert cfg.loss_type == "gpg" and "plug_gpg" in sys.modules
    assert "package 'gpg-objective'" in registry.get_objective("gpg").source
    assert registry.get_shaping("policy_gradient").consumes == {"logprobs"}
    import torch

    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, _ = policy_loss(logp, logp.detach(), torch.tensor([2.0]), torch.ones(1, 2, dtype=torch.bool), "gpg")
    loss.backward()
    assert loss.item() == 3.0 and logp.grad.tolist() == [[-1.0, -1.0]]  # -(2 * -1 + 2 * -2) / 2; -A / N


def test_other_plugins_are_not_imported(site):
    install(site, "two", {"gpg": "plug_gpg:register", "other": "plug_other:register"},
            {"plug_gpg": GPG_MODULE, "plug_other": "raise RuntimeError('must not be imported')\n"})
    resolve("gpg")
    assert "plug_gpg" in sys.modules and "plug_other" not in sys.modules


@pytest.mark.parametrize(("module", "target", "message"), [
    ("raise RuntimeError('boom')\n", "plug_broken:register",
     r"loss_type 'broken' comes from package 'broken-objective' \(entry point broken = 'plug_broken:register' in "
     r"group 'sapo.objectives'\), which failed to load: RuntimeError: boom"),
    (None, "plug_missing:register", "package 'broken-objective'.*failed to load: ModuleNotFoundError"),
    ("register = 3\n", "plug_broken:register", "failed to load: ValueError: the entry point's object is a int, "
     "not a callable that registers"),
    ("def register():\n    pass\n", "plug_broken:register",
     r"register\(\) ran but registered no objective named 'broken'"),
    ("def register():\n    raise KeyError('tau')\n", "plug_broken:register", "failed to load: KeyError"),
])
def test_a_broken_plugin_names_its_package(site, module, target, message):
    install(site, "broken-objective", {"broken": target}, {"plug_broken": module} if module else {})
    assert "broken" in loss_types()  # listed from metadata: nothing imported yet
    with pytest.raises(ValueError, match=message):
        resolve("broken")
    with pytest.raises(ConfigError, match=message):
        build_config(overrides={"loss_type": "broken"})


def test_a_name_from_two_packages_is_refused_and_builtins_are_never_shadowed(site):
    install(site, "first", {"gpg": "plug_a:register", "grpo": "plug_c:register"},
            {"plug_a": GPG_MODULE, "plug_c": "raise RuntimeError('shadowing grpo')\n"})
    install(site, "second", {"gpg": "plug_b:register"}, {"plug_b": GPG_MODULE})
    with pytest.raises(ValueError, match="'gpg' is provided by several installed packages: package 'first'.*"
                                         "package 'second'.*uninstall all but one"):
        resolve("gpg")
    assert resolve("grpo").shaping == "clip" and "plug_c" not in sys.modules
    assert loss_types().count("grpo") == 1


def test_unknown_loss_type_lists_plugins(site):
    install(site, "gpg-objective", {"gpg": "plug_gpg:register"}, {"plug_gpg": GPG_MODULE})
    with pytest.raises(ConfigError, match="loss_type='ppo' is not one of sapo, grpo, .*, gpg"):
        build_config(overrides={"loss_type": "ppo"})


def test_cli_trains_with_an_installed_plugin_objective(sapo_cache, tmp_path):
    """`pip install` of a package declaring the entry point is all it takes: `sapo train loss_type=gpg`."""
    site = install(tmp_path / "site", "gpg-objective", {"gpg": "plug_gpg:register"}, {"plug_gpg": GPG_MODULE})
    out = tmp_path / "run"
    proc = run_sapo(sapo_cache, ["train", *TINY, "loss_type=gpg", "max_steps=2", "eval_steps=0",
                                 f"output_dir={out}"], PYTHONPATH=os.pathsep.join([str(REPO), str(site)]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    assert all(math.isfinite(row["loss/total"]) for row in rows)


def test_training_in_process_with_an_objective_registered_by_the_public_call(sapo_cache, tmp_path, monkeypatch):
    """A clip-higher GRPO variant registered in user code; `sapo.cli.main` (the trainer) runs it in-process."""
    from sapo.objectives import register_objective
    from tests.reliability.conftest import cli

    monkeypatch.setattr(registry, "_OBJECTIVES", dict(registry._OBJECTIVES))
    register_objective("grpo_clip_higher", ratio_level="token", shaping="clip", aggregation="token_mean",
                       epsilon_low=0.2, epsilon_high=0.4)
    out = tmp_path / "run"
    assert cli(["train", *TINY, "loss_type=grpo_clip_higher", "max_steps=2", "eval_steps=0",
                f"output_dir={out}"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    assert all(math.isfinite(row["loss/total"]) for row in rows)
    assert "clip/high_frac" in rows[0]  # the clip shaping's diagnostics come with it


def test_listing_and_validating_objectives_imports_no_torch(tmp_path):
    """`sapo train --help` and the loss_type check read the registry without importing torch (~1.5 s)."""
    import subprocess

    code = ("import sys; from sapo.config import _check_loss_type, help_text; from sapo.objectives import resolve; "
            "assert 'gpg' in help_text(); _check_loss_type('dr_grpo'); resolve('cispo'); "
            "assert resolve('cispo').consumes == {'logprobs', 'detached_ratio'}; "
            "print('torch' in sys.modules)")
    site = install(tmp_path / "site", "gpg-objective", {"gpg": "plug_gpg:register"}, {"plug_gpg": GPG_MODULE})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(site)])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False"
