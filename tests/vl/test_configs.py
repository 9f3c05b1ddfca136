"""The shipped VL configs are valid and keep the evaluation guard rails."""

from pathlib import Path

import pytest

from sapo.config import ConfigError, build_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
NEG_TASK_PROBLEMS = 42  # every held-out problem of builtin:vl-digits-neg


@pytest.mark.parametrize("name", ["vl-digits.yaml", "vl-digits-easy.yaml", "vl-digits-moe.yaml",
                                  "vl-qwen3-vl-gpu.yaml"])
def test_vl_configs_validate_with_guard_rails(name):
    cfg = build_config(CONFIGS / name)
    wanted = NEG_TASK_PROBLEMS if "builtin:vl-digits-neg" in (cfg.dataset, cfg.eval_dataset) else 200
    assert cfg.eval_num_problems >= wanted and cfg.eval_num_samples >= 4
    assert cfg.eval_steps > 0 and cfg.loss_type == "sapo"


@pytest.mark.parametrize("name", ["vl-digits.yaml", "vl-digits-moe.yaml"])
def test_vl_demos_have_a_coverage_gap_and_evaluate_the_whole_held_out_split(name):
    from sapo.training.tasks import load_examples
    from sapo.training.warmstart import WarmStartRecipe

    cfg = build_config(CONFIGS / name)
    assert cfg.eval_dataset == "builtin:vl-digits-neg" and cfg.eval_temperatures  # greedy and best-T beside T = 1
    assert cfg.dataset == "builtin:vl-digits"  # RL on every problem, so that it cannot learn "always a minus"
    assert WarmStartRecipe.from_config(cfg).teacher_sign_error > 0.5  # the sloppy teacher: mostly no sign
    cfg.train_size = 50  # the data as the run reads it, held-out split included, without building a model
    _, held_out = load_examples(cfg)
    assert len(held_out) == cfg.eval_num_problems == NEG_TASK_PROBLEMS
    cfg.eval_num_problems = 200  # more than exist: a clear error before any model is built
    with pytest.raises(ConfigError, match="eval_num_problems to 42 or fewer"):
        load_examples(cfg)


def test_the_easy_vl_config_keeps_the_old_warm_start():
    from sapo.training.warmstart import WarmStartRecipe

    easy = build_config(CONFIGS / "vl-digits-easy.yaml")
    assert easy.dataset == "builtin:vl-digits"
    assert WarmStartRecipe.from_config(easy) == WarmStartRecipe(steps=800, label_smoothing=0.05)  # its cache key
