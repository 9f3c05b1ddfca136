"""Shared pieces of the reliability tests: a warm-started tiny model built once per session, and
helpers that run `python -m sapo train ...` as a subprocess (the way a user runs it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # user reward modules are imported as tests.reliability.user_rewards
    sys.path.insert(0, str(REPO))
WARMSTART_STEPS = 20
TINY = [
    f"warmstart_steps={WARMSTART_STEPS}", "train_size=200", "prompts_per_step=4", "num_generations=4",
    "num_minibatches=2", "max_completion_length=24", "eval_num_problems=8", "eval_num_samples=2",
    "eval_pass_k=[1,2]", "threads=1", "progress=false", "report=false", "tensorboard=false",
]
USER = "tests.reliability.user_rewards"
# keys that measure wall time (or throughput): never identical between two runs
TIMING_PREFIXES = ("time/", "tokens/completion_per_s", "async/sync_s", "async/sampler_wait_s", "async/trainer_wait_s")


@pytest.fixture(scope="session")
def sapo_cache(tmp_path_factory) -> Path:
    """A SAPO_CACHE holding the builtin:arith-moe model warm-started for WARMSTART_STEPS steps."""
    from sapo.training.warmstart import WarmStartRecipe, builtin_model_path

    cache = tmp_path_factory.mktemp("sapo-cache")
    previous = os.environ.get("SAPO_CACHE")
    os.environ["SAPO_CACHE"] = str(cache)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from sapo.config import build_config

        recipe = WarmStartRecipe.from_config(build_config(overrides={"warmstart_steps": WARMSTART_STEPS}))
        builtin_model_path("builtin:arith-moe", recipe, verbose=False)
    finally:
        torch.set_num_threads(threads)
    yield cache
    if previous is None:
        os.environ.pop("SAPO_CACHE", None)
    else:
        os.environ["SAPO_CACHE"] = previous


def sapo_env(cache: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAPO_TEST_")}
    env.update({"SAPO_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    env.update(extra)
    return env


def sapo_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "sapo", *args]


def run_sapo(cache: Path, args: list[str], *, timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    """`python -m sapo ARGS` to completion (or death); stdout and stderr captured as text."""
    return subprocess.run(sapo_cmd(*args), cwd=REPO, env=sapo_env(cache, **env), capture_output=True,
                          text=True, timeout=timeout)


def metric_rows(output_dir: Path) -> list[dict]:
    """metrics.jsonl rows without the wall-time keys."""
    rows = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith(TIMING_PREFIXES)} for row in rows]


def checkpoint_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    """Trainable weights of the newest complete checkpoint."""
    from sapo.checkpoint import latest_checkpoint

    path = latest_checkpoint(output_dir)
    assert path is not None, f"no checkpoint in {output_dir}"
    return torch.load(path / "model.pt", weights_only=True)


def cli(args: list[str]) -> int:
    """`sapo ARGS` in this process (sapo.cli.main is what `python -m sapo` runs); returns the exit code."""
    from sapo.cli import main

    return main(args)


def user_rewards_module():
    """The module `rewards=[tests.reliability.user_rewards:...]` loads (not this folder's `user_rewards`)."""
    import importlib

    return importlib.import_module(USER)
