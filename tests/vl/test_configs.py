"""The shipped VL configs are valid and keep the evaluation guard rails."""

from pathlib import Path

import pytest

from sapo.config import build_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", ["vl-digits.yaml", "vl-digits-moe.yaml", "vl-qwen3-vl-gpu.yaml"])
def test_vl_configs_validate_with_guard_rails(name):
    cfg = build_config(CONFIGS / name)
    assert cfg.eval_num_problems >= 200 and cfg.eval_num_samples >= 4
    assert cfg.eval_steps > 0 and cfg.loss_type == "sapo"
