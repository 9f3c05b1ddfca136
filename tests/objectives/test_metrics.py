import math

import pytest
import torch

from sapo.objectives import metric_names, policy_loss
from sapo.objectives.metrics import numpy_quantiles, quantiles, torch_quantiles
from sapo.objectives.shaping import soft_gate_weight


@pytest.mark.parametrize("implementation", [quantiles, numpy_quantiles, torch_quantiles])
@pytest.mark.parametrize("seed", range(4))
def test_quantiles_match_torch_quantile(seed, implementation):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(1 + seed * 7, generator=gen)
    qs = (0.01, 0.1, 0.5, 0.9, 0.99)
    expected = torch.quantile(values, torch.tensor(qs))
    assert torch.allclose(implementation(values, qs), expected, atol=1e-6)


def test_empty_sets_give_nan():
    assert torch.isnan(quantiles(torch.ones(0), (0.5, 0.9))).all()
    _, metrics = policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2), torch.zeros(2, 3), "sapo")
    assert math.isnan(metrics["ratio/mean"]) and math.isnan(metrics["log_ratio/q50"])
    assert math.isnan(metrics["ratio/min"]) and math.isnan(metrics["sapo/seq_gate_gap"])
    assert metrics["loss/policy"] == 0.0


def test_ratio_and_log_ratio_statistics():
    gen = torch.Generator().manual_seed(0)
    logprobs, old = -torch.rand(4, 6, generator=gen), -torch.rand(4, 6, generator=gen)
    mask = torch.rand(4, 6, generator=gen) > 0.3
    _, metrics = policy_loss(logprobs, old, torch.randn(4, generator=gen), mask, "grpo")
    z = (logprobs - old)[mask]
    r = torch.exp(z)
    assert metrics["ratio/mean"] == pytest.approx(r.mean().item(), rel=1e-6)
    assert metrics["ratio/std"] == pytest.approx(r.std(unbiased=False).item(), rel=1e-5)
    assert metrics["ratio/min"] == pytest.approx(r.min().item())
    assert metrics["ratio/max"] == pytest.approx(r.max().item())
    assert metrics["log_ratio/q50"] == pytest.approx(z.median().item() if z.numel() % 2 else
                                                     torch.quantile(z, 0.5).item(), abs=1e-6)
    variances = [(logprobs - old)[i][mask[i]].var(unbiased=False).item() for i in range(4) if mask[i].any()]
    assert metrics["log_ratio/seq_var_mean"] == pytest.approx(sum(variances) / len(variances), rel=1e-5)


def test_sapo_gate_metrics_split_by_advantage_sign():
    # Row 0 (A > 0): r = 3, 1 ; row 1 (A < 0): r = 1, 1 ; row 2 (A = 0) counts in the totals only.
    logprobs = torch.zeros(3, 2)
    old = torch.tensor([[-math.log(3.0), 0.0], [0.0, 0.0], [0.0, 0.0]])
    _, metrics = policy_loss(logprobs, old, torch.tensor([1.0, -1.0, 0.0]), torch.ones(3, 2), "sapo")
    w3 = 0.41997  # golden gate at r = 3, tau = 1
    assert metrics["sapo/gate_mean_pos"] == pytest.approx((w3 + 1) / 2, abs=1e-5)
    assert metrics["sapo/gate_mean_neg"] == 1.0
    assert metrics["sapo/gate_lt_0.5_frac_pos"] == 0.5
    assert metrics["sapo/gate_lt_0.5_frac_neg"] == 0.0
    assert metrics["sapo/gate_lt_0.5_frac"] == pytest.approx(1 / 6)
    assert metrics["sapo/gate_mean"] == pytest.approx((w3 + 5) / 6, abs=1e-5)
    assert metrics["sapo/log_ratio_q90_pos"] == pytest.approx(0.9 * math.log(3.0), rel=1e-5)
    assert metrics["sapo/log_ratio_q50_neg"] == 0.0


def test_sapo_gate_metrics_nan_without_negative_advantages():
    _, metrics = policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2), "sapo")
    assert math.isnan(metrics["sapo/gate_mean_neg"]) and math.isnan(metrics["sapo/log_ratio_q10_neg"])
    assert metrics["sapo/gate_mean_pos"] == 1.0


def test_seq_gate_gap_value_and_bound():
    # One sequence, z = (+0.2, -0.2): log s = 0, g(log s) = 1, mean g(z) = sech^2(0.1).
    logprobs = torch.zeros(1, 2)
    old = torch.tensor([[-0.2, 0.2]])
    _, metrics = policy_loss(logprobs, old, torch.tensor([1.0]), torch.ones(1, 2), "sapo")
    gap = 1 - soft_gate_weight(torch.tensor(1.2), torch.tensor(1.0)).item()
    assert metrics["sapo/seq_gate_gap"] == pytest.approx(gap, rel=1e-4)
    assert metrics["sapo/seq_gate_gap_bound"] == pytest.approx(0.25 * 0.04, rel=1e-5)  # tau^2/4 * Var_i
    assert metrics["sapo/seq_gate_gap"] <= metrics["sapo/seq_gate_gap_bound"]


@pytest.mark.parametrize("seed", range(3))
def test_seq_gate_gap_within_the_paper_bound(seed):
    gen = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(8, 16, generator=gen)
    old = logprobs + 0.1 * torch.randn(8, 16, generator=gen)
    _, metrics = policy_loss(logprobs, old, torch.randn(8, generator=gen), torch.ones(8, 16), "sapo")
    assert 0 < metrics["sapo/seq_gate_gap"] <= metrics["sapo/seq_gate_gap_bound"]


def test_clip_fractions_count_tokens_whose_gradient_is_cut():
    logprobs = torch.zeros(1, 4)
    old = -torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]]))  # r = 1.5, 1.5, 0.5, 0.5
    advantages = torch.tensor([[1.0, -1.0, -1.0, 1.0]])
    _, metrics = policy_loss(logprobs, old, advantages, torch.ones(1, 4), "grpo")
    assert (metrics["clip/high_frac"], metrics["clip/low_frac"], metrics["clip/frac"]) == (0.25, 0.25, 0.5)


def test_gspo_clip_fractions_count_sequences():
    logprobs = torch.zeros(3, 3)
    old = torch.tensor([[-0.01, 0.0, 0.0], [0.0, 0.0, 0.0], [0.01, 0.01, 0.0]])
    mask = torch.tensor([[True, False, False], [True, True, True], [False, True, True]])
    _, metrics = policy_loss(logprobs, old, torch.tensor([1.0, 1.0, -1.0]), mask, "gspo")
    assert metrics["clip/seq_high_frac"] == pytest.approx(1 / 3)
    assert metrics["clip/seq_low_frac"] == pytest.approx(1 / 3)
    assert metrics["clip/seq_frac"] == pytest.approx(2 / 3)
    assert metrics["seq_ratio/max"] == pytest.approx(math.exp(0.01), rel=1e-6)


def test_metric_names_by_family():
    assert "sapo/seq_gate_gap" in metric_names("sapo")
    assert "clip/frac" in metric_names("grpo") and "sapo/gate_mean" not in metric_names("grpo")
    assert "clip/seq_frac" in metric_names("gspo") and "clip/frac" not in metric_names("gspo")
    assert "clip/frac" in metric_names("gspo_token")
    assert metric_names("cispo")[-1] == "cispo/capped_frac"
    assert "kl/mean" in metric_names("sapo", beta=0.1) and "kl/mean" not in metric_names("sapo")
