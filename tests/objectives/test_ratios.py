import math

import torch

from sapo.objectives.ratios import sequence_log_ratio, sequence_token_ratio, token_log_ratio


def test_token_log_ratio_is_float32_and_clamped():
    logp = torch.tensor([[0.0, -60.0, 30.0]], dtype=torch.bfloat16)
    old = torch.tensor([[0.0, 0.0, -30.0]], dtype=torch.bfloat16)
    z = token_log_ratio(logp, old, 20.0)
    assert z.dtype == torch.float32
    assert z.tolist() == [[0.0, -20.0, 20.0]]


def test_token_log_ratio_gradient_only_through_logprobs():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    old = torch.tensor([[-1.5, -1.0]], requires_grad=True)
    token_log_ratio(logp, old, 20.0).sum().backward()
    assert logp.grad.tolist() == [[1.0, 1.0]]
    assert old.grad is None


def test_sequence_log_ratio_is_masked_mean_and_empty_rows_give_zero():
    z = torch.tensor([[0.3, 0.1, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    assert torch.allclose(sequence_log_ratio(z, mask), torch.tensor([0.2, 0.0]))


def test_sequence_token_ratio_value_and_gradient():
    logp = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    seq_log_ratio = torch.tensor([0.4], requires_grad=True)
    ratio = sequence_token_ratio(logp, seq_log_ratio)
    assert torch.allclose(ratio, torch.full((1, 3), math.exp(0.4)))
    ratio.sum().backward()
    assert torch.allclose(logp.grad, torch.full((1, 3), math.exp(0.4)))  # d s_it / d logp_t = s_i
    assert seq_log_ratio.grad is None  # sg[s_i]
