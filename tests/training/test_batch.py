import torch

from sapo.rollout import RolloutBatch
from sapo.training.batch import group_advantages, merge_metrics, pack_rollout, select_rows


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
