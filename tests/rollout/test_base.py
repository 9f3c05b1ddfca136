import pytest
import torch

from sapo.rollout import RolloutBatch, SamplingParams, make_engine, register_engine
from sapo.rollout.base import check_generate_args, left_pad


def test_to_padded_layout():
    batch = RolloutBatch(
        prompt_ids=[[5, 6], [7]], completion_ids=[[8], [9, 2, 3]], sampler_logprobs=[[-0.5], [-1.0, -2.0, -3.0]],
        truncated=[False, True],
    )
    out = batch.to_padded(pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 8, 0, 0], [0, 7, 9, 2, 3]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]]
    assert out["completion_mask"].tolist() == [[0, 0, 1, 0, 0], [0, 0, 1, 1, 1]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 2, 2], [0, 0, 1, 2, 3]]
    assert out["sampler_logprobs"].tolist() == [[0, 0, -0.5, 0, 0], [0, 0, -1.0, -2.0, -3.0]]
    assert batch.num_completion_tokens == 4 and len(batch) == 2


def test_rollout_batch_rejects_mismatched_fields():
    with pytest.raises(ValueError, match="one entry per prompt"):
        RolloutBatch([[1]], [[2], [3]], [[0.0]], [False])
    with pytest.raises(ValueError, match="row 0: 2 completion tokens but 1 sampler log-probs"):
        RolloutBatch([[1]], [[2, 3]], [[0.0]], [False])


SAMPLING = {"max_new_tokens": 4, "eos_token_ids": [3], "pad_token_id": 0}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"top_p": 0.0}, "top_p must be in"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"eos_token_ids": []}, "eos_token_ids is empty"),
    ],
)
def test_sampling_params_messages(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{**SAMPLING, **kwargs})


@pytest.mark.parametrize(
    "prompt_ids, extra_inputs, message",
    [
        ([], None, "prompt_ids is empty"),
        ([[1], []], None, "prompt 1 is empty"),
        ([[1, 2]], [{}, {}], "one dict per prompt"),
    ],
)
def test_check_generate_args_messages(prompt_ids, extra_inputs, message):
    with pytest.raises(ValueError, match=message):
        check_generate_args(prompt_ids, SamplingParams(**SAMPLING), extra_inputs)
    with pytest.raises(TypeError, match="SamplingParams"):
        check_generate_args([[1]], SAMPLING, None)


def test_sampling_params_equality_ignores_the_stream_and_greedy_keeps_the_limits():
    a = SamplingParams(**SAMPLING, temperature=0.7, top_k=5, generator=torch.Generator().manual_seed(1))
    b = SamplingParams(**SAMPLING, temperature=0.7, top_k=5)
    assert a == b and a.eos_token_ids == (3,)
    greedy = a.greedy_variant()
    assert greedy.greedy and greedy.temperature == 1.0 and greedy.generator is None
    assert (greedy.max_new_tokens, greedy.eos_token_ids, greedy.top_k) == (4, (3,), 5)


def test_make_engine_unknown_name():
    with pytest.raises(ValueError, match="unknown rollout engine 'vllm'; choose one of"):
        make_engine("vllm", torch.nn.Linear(1, 1))


def test_register_engine_adds_a_name_the_config_accepts(monkeypatch):
    from sapo.config import ConfigError, build_config
    from sapo.rollout import registry

    monkeypatch.setattr(registry, "ENGINES", dict(registry.ENGINES))
    with pytest.raises(ConfigError, match="not a registered rollout engine"):
        build_config(overrides={"engine": "mine"})
    register_engine("mine", lambda model, **options: ("built", model, options))
    assert make_engine("mine", "model", cache="x") == ("built", "model", {"cache": "x"})
    assert build_config(overrides={"engine": "mine"}).engine == "mine"
    with pytest.raises(ValueError, match="already registered"):
        register_engine("mine", lambda model: None)


def test_left_pad():
    input_ids, attention_mask = left_pad([[4, 5, 6], [7]], pad_token_id=9)
    assert input_ids.tolist() == [[4, 5, 6], [9, 9, 7]]
    assert attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_listing_engines_and_validating_a_config_import_no_torch():
    """Config validation checks engine=NAME against the registry without importing torch (~2 s here)."""
    import subprocess
    import sys

    code = ("import sys; from sapo.config import build_config; build_config(overrides={'engine': 'torch-copy'}); "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "False"]
