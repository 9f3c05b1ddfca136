import pytest


@pytest.fixture(scope="session")
def sapo_cache(tmp_path_factory):
    """One warm-started built-in model per test session, in a private cache folder."""
    import os

    root = tmp_path_factory.mktemp("sapo-cache")
    old = os.environ.get("SAPO_CACHE")
    os.environ["SAPO_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("SAPO_CACHE", None)
    else:
        os.environ["SAPO_CACHE"] = old


TINY = {
    "warmstart_steps": "40", "train_size": "400", "prompts_per_step": "4", "num_generations": "4",
    "num_minibatches": "2", "max_completion_length": "24", "eval_num_problems": "8", "eval_num_samples": "2",
    "eval_pass_k": "[1,2]", "eval_steps": "0", "threads": "1", "progress": "false", "tensorboard": "false",
    "report": "false", "log_samples": "2", "rewards": "[math,tests.training.rewards:shorter_is_better]",
}
