"""`python -m sapo train` on tiny non-Qwen MoE models saved as ordinary model folders, with routing replay.

Two mini-batches per step at a large learning rate, so the second update of a step runs on weights
that already moved: the routers then prefer other experts on some tokens (moe/routing_changed > 0)
and replay must still force pi_old's (R2) or the sampler's (R3) experts (moe/replay_mismatch = 0).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUN = [
    "max_steps=2", "train_size=16", "prompts_per_step=2", "num_generations=4", "max_completion_length=12",
    "num_minibatches=2", "eval_steps=0", "threads=1", "progress=false", "report=false", "tensorboard=false",
    "lr=3e-2", "rewards=[tests.training.rewards:shorter_is_better]",  # varies in every group: real gradients
]


def _save(folder: Path, family: str) -> Path:
    """A tiny `family` model and the built-in task's character tokenizer, as save_pretrained writes them."""
    from sapo.data.builtin import BUILTIN_ALPHABET
    from sapo.models.char_tokenizer import build_char_tokenizer
    from sapo.models.tiny_moe import build_tiny_moe

    tokenizer = build_char_tokenizer(BUILTIN_ALPHABET)
    build_tiny_moe(family, len(tokenizer), seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _train(model: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAPO_TEST_")}
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    command = [sys.executable, "-m", "sapo", "train", f"model={model}", f"output_dir={out}", *RUN, *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "family, replay", [("mixtral", "R2"), ("qwen2_moe", "R2"), ("deepseek_v3", "R2"), ("olmoe", "R3")]
)
def test_train_with_routing_replay(tmp_path, family, replay):
    model = _save(tmp_path / "model", family)
    result = _train(model, tmp_path / "run", f"routing_replay={replay}")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:
        assert row["moe/replay_mismatch"] == 0.0
        assert row["nonfinite/skipped_total"] == 0
    # the routers moved under the first update of a step, so replay had something to force
    assert max(row["moe/routing_changed"] for row in rows) > 0.0
    if replay == "R3":
        assert all("moe/r3_mismatch" in row for row in rows)
    assert (tmp_path / "run" / "final_model" / "config.json").exists()


def test_an_unknown_router_family_loads_and_refuses_only_replay(tmp_path):
    """PhiMoE's router is a kind sapo does not register: the policy loads and trains without replay;
    asking for replay (or a load-balancing loss, which needs its router logits) fails at load, naming
    the feature and the family."""
    from transformers import PhimoeConfig, PhimoeForCausalLM

    from sapo.config import ConfigError, build_config
    from sapo.data.builtin import BUILTIN_ALPHABET
    from sapo.models.char_tokenizer import build_char_tokenizer
    from sapo.training.policy import load_policy

    tokenizer = build_char_tokenizer(BUILTIN_ALPHABET)
    config = PhimoeConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2, router_aux_loss_coef=0.0,
                          output_router_logits=False)
    folder = tmp_path / "phimoe"
    PhimoeForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    policy = load_policy(build_config(overrides={"model": str(folder)}))
    assert policy.is_moe and not policy.routing_recordable
    for override, feature in (({"routing_replay": "R2"}, "routing_replay=R2"),
                              ({"loss_type": "grpo_r2"}, "routing_replay=R2"),
                              ({"router_aux_loss_coef": "0.01"}, "router_aux_loss_coef")):
        with pytest.raises(ConfigError, match=rf"{feature}.*not available.*phimoe.*PhimoeTopKRouter"):
            load_policy(build_config(overrides={"model": str(folder), **override}))
