import pytest
import torch

from sapo.rollout import RolloutBatch
from sapo.training.batch import (
    group_advantages,
    merge_metrics,
    micro_batch_plan,
    pack_rollout,
    select_rows,
    split_plan,
    trim_padding,
)


def test_group_advantages_sample_std_per_group():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    adv = group_advantages(rewards, "group")
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()  # sample std (unbiased), as torch.std
    assert torch.allclose(adv[0], (rewards[0] - 0.5) / (std + 1e-4))
    assert torch.equal(adv[1], torch.zeros(4))  # all-equal group: no signal


def test_group_advantages_none_keeps_mean_baseline_only():
    rewards = torch.tensor([[3.0, 1.0]])
    assert torch.equal(group_advantages(rewards, "none"), torch.tensor([[1.0, -1.0]]))


def test_group_advantages_batch_std():
    rewards = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    adv = group_advantages(rewards, "batch")
    assert torch.allclose(adv[0], torch.tensor([0.5, -0.5]) / (rewards.std() + 1e-4))


def test_pack_rollout_layout_and_truncation_mask():
    batch = RolloutBatch(prompt_ids=[[5, 6, 7], [8]], completion_ids=[[1, 2], [3, 4, 9]],
                         sampler_logprobs=[[-0.1, -0.2], [-0.3, -0.4, -0.5]], truncated=[False, True])
    t = pack_rollout(batch, [1.0, -1.0], pad_id=0, mask_truncated=True)
    assert t.prompt_width == 3
    assert t.input_ids.tolist() == [[5, 6, 7, 1, 2, 0], [0, 0, 8, 3, 4, 9]]
    assert t.position_ids[1, 2:].tolist() == [0, 1, 2, 3]
    assert t.completion_mask.tolist() == [[True, True, False], [False, False, False]]
    assert torch.allclose(t.sampler_logprobs[1], torch.tensor([-0.3, -0.4, -0.5]))
    t2 = pack_rollout(batch, [1.0, -1.0], pad_id=0, mask_truncated=False)
    assert t2.completion_mask[1].tolist() == [True, True, True]
    sub = select_rows(t2, torch.tensor([1]))
    assert sub.input_ids.tolist() == [[0, 0, 8, 3, 4, 9]] and sub.advantages.tolist() == [-1.0]


def test_merge_metrics_min_max_mean():
    m = merge_metrics([{"ratio/min": 0.5, "ratio/max": 2.0, "x": 1.0}, {"ratio/min": 0.2, "ratio/max": 3.0, "x": 3.0}])
    assert m == {"ratio/min": 0.2, "ratio/max": 3.0, "x": 2.0}


def _ragged(prompt_lens, completion_lens):
    batch = RolloutBatch(
        prompt_ids=[[5] * p for p in prompt_lens], completion_ids=[[7] * c for c in completion_lens],
        sampler_logprobs=[[-0.5] * c for c in completion_lens], truncated=[False] * len(prompt_lens),
    )
    return pack_rollout(batch, [float(i) for i in range(len(prompt_lens))], pad_id=0, mask_truncated=False)


def test_trim_padding_drops_columns_that_are_padding_in_every_row():
    t = _ragged([4, 2, 1], [1, 5, 2])  # P = 4, C = 5
    part, left = trim_padding(select_rows(t, torch.tensor([1, 2])))  # prompts 2, 1; completions 5, 2
    assert left == 2 and part.prompt_width == 2
    assert part.input_ids.tolist() == [[5, 5, 7, 7, 7, 7, 7], [0, 5, 7, 7, 0, 0, 0]]
    assert part.position_ids[1, 1:4].tolist() == [0, 1, 2]  # still counted from the first real token
    short, left = trim_padding(select_rows(t, torch.tensor([0, 2])))  # completions 1, 2: C' = 2
    assert left == 0 and short.completion_mask.tolist() == [[True, False], [True, True]]
    assert short.input_ids.shape == (2, 6) and short.sampler_logprobs.shape == (2, 2)
    same, left = trim_padding(t)
    assert same is t and left == 0


def test_micro_batch_plan_keeps_the_budget_and_every_row_once():
    t = _ragged([4, 2, 1, 3, 1, 2], [1, 5, 2, 4, 1, 5])  # lengths 5, 7, 3, 7, 2, 7
    rows = torch.arange(6)
    plan = micro_batch_plan(t, rows, max_tokens=16)
    assert sorted(torch.cat(plan).tolist()) == list(range(6))
    for micro in plan:
        part, _ = trim_padding(select_rows(t, micro))
        assert part.input_ids.numel() <= 16 or len(micro) == 1
    assert plan[0].tolist() == [1, 3]  # longest first: similar lengths share a micro-batch
    assert [len(m) for m in micro_batch_plan(t, rows, max_tokens=1000, max_rows=4)] == [4, 2]
    assert [m.tolist() for m in micro_batch_plan(t, rows, max_rows=4)] == [[0, 1, 2, 3], [4, 5]]
    assert [len(m) for m in micro_batch_plan(t, rows, max_tokens=1)] == [1] * 6  # too long rows go alone


def test_split_plan_matches_another_ranks_count():
    plan = [torch.tensor([0, 1, 2, 3]), torch.tensor([4])]
    split = split_plan(plan, 4)
    assert [m.tolist() for m in split] == [[0], [1], [2, 3], [4]]
    with pytest.raises(ValueError, match="raise micro_batch_tokens"):
        split_plan([torch.tensor([0]), torch.tensor([1])], 3)
