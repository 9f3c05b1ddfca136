import os

import pytest

TINY = {
    "warmstart_steps": "20", "train_size": "200", "prompts_per_step": "4", "num_generations": "4",
    "num_minibatches": "2", "max_completion_length": "16", "eval_steps": "0", "threads": "1",
    "progress": "false", "tensorboard": "false", "report": "false", "log_samples": "2",
    "max_steps": "2", "save_steps": "1", "lr": "1e-3", "rewards": "[tests.training.rewards:shorter_is_better]",
}


@pytest.fixture(scope="session")
def sapo_cache(tmp_path_factory):
    """builtin:arith-moe warm-started once, in a private cache the launched processes inherit."""
    from sapo.training.warmstart import WarmStartRecipe, builtin_model_path

    root = tmp_path_factory.mktemp("sapo-cache-dist")
    old = os.environ.get("SAPO_CACHE")
    os.environ["SAPO_CACHE"] = str(root)
    from sapo.config import build_config

    recipe = WarmStartRecipe.from_config(build_config(overrides={"warmstart_steps": TINY["warmstart_steps"]}))
    builtin_model_path("builtin:arith-moe", recipe, verbose=False)
    yield root
    if old is None:
        os.environ.pop("SAPO_CACHE", None)
    else:
        os.environ["SAPO_CACHE"] = old
