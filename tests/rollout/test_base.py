import pytest
import torch

from sapo.rollout import RolloutBatch, make_engine
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


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt_ids": []}, "prompt_ids is empty"),
        ({"prompt_ids": [[1], []]}, "prompt 1 is empty"),
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"top_p": 0.0}, "top_p must be in"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"eos_token_ids": []}, "eos_token_ids is empty"),
        ({"extra_inputs": [{}, {}]}, "one dict per prompt"),
    ],
)
def test_check_generate_args_messages(kwargs, message):
    args = {"prompt_ids": [[1, 2]], "max_new_tokens": 4, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
            "eos_token_ids": [3], "extra_inputs": None}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        check_generate_args(**args)


def test_make_engine_unknown_name():
    with pytest.raises(ValueError, match="unknown rollout engine 'vllm'; choose one of"):
        make_engine("vllm", torch.nn.Linear(1, 1))


def test_left_pad():
    input_ids, attention_mask = left_pad([[4, 5, 6], [7]], pad_token_id=9)
    assert input_ids.tolist() == [[4, 5, 6], [9, 9, 7]]
    assert attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
