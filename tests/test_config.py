import pytest

from sapo.config import ConfigError, TrainConfig, build_config, help_text, parse_overrides


def test_defaults_validate():
    cfg = build_config()
    assert cfg.loss_type == "sapo" and cfg.tau_pos == 1.0 and cfg.tau_neg == 1.05
    assert cfg.rollout_batch_size == cfg.prompts_per_step * cfg.num_generations


def test_overrides_are_coerced():
    cfg = build_config(overrides=parse_overrides(["lr=3e-4", "max_steps=7", "tensorboard=false",
                                                  "rewards=math,format", "eval_pass_k=[1,4]"]))
    assert cfg.lr == 3e-4 and cfg.max_steps == 7 and cfg.tensorboard is False
    assert cfg.rewards == ["math", "format"] and cfg.eval_pass_k == [1, 4]


def test_unknown_key_suggests():
    with pytest.raises(ConfigError, match="Did you mean.*num_generations"):
        build_config(overrides={"num_generation": "4"})


@pytest.mark.parametrize("key,value,match", [
    ("loss_type", "ppo", "one of"),
    ("max_steps", "1.5", "integer"),
    ("lr", "fast", "number"),
    ("tau_neg", "0", "tau"),
    ("num_minibatches", "1000", "larger than the rollout batch"),
    ("num_minibatches", "3", "equal mini-batches"),
    ("num_generations", "1", "group"),
    ("temperature", "0", "temperature"),
    ("tensorboard", "maybe", "true or false"),
    ("norm_lr_scale", "-2", "norm_lr_scale"),
    ("micro_batch_tokens", "-1", "micro_batch_tokens"),
])
def test_bad_values_fail_before_work(key, value, match):
    with pytest.raises(ConfigError, match=match):
        build_config(overrides={key: value})


def test_jsonl_dataset_needs_field_mapping():
    with pytest.raises(ConfigError, match="prompt_field"):
        build_config(overrides={"dataset": "data.jsonl"})


def test_yaml_file_nested_groups(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 2.0e-4\nloss_type: grpo\n")
    cfg = build_config(path, {"seed": "3"})
    assert cfg.lr == 2e-4 and cfg.loss_type == "grpo" and cfg.seed == 3


def test_grpo_r2_implies_replay():
    assert build_config(overrides={"loss_type": "grpo_r2"}).routing_replay == "R2"


def test_help_lists_every_key():
    text = help_text()
    for name in TrainConfig.__dataclass_fields__:
        assert f"  {name} = " in text


def test_benchmark_files_need_no_field_mapping():
    cfg = build_config(overrides={"dataset": "gsm8k:../shared/data/gsm8k/train.jsonl"})
    assert cfg.prompt_field == ""
