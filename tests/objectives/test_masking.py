import math

import torch

from sapo.objectives.masking import float_mask, masked_finite, nan_if

NAN, INF = math.nan, math.inf


def test_float_mask_from_bool_and_numbers():
    assert float_mask(torch.tensor([True, False])).tolist() == [1.0, 0.0]
    assert float_mask(torch.tensor([2, 0, 1])).tolist() == [1.0, 0.0, 1.0]
    assert float_mask(torch.tensor([0.5, 0.0])).dtype == torch.float32


def test_masked_finite_zeroes_garbage_in_masked_slots_values_and_gradient():
    values = torch.tensor([1.5, NAN, INF, -INF, 2.0], requires_grad=True)
    mask = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0])
    out, has_nan = masked_finite(values, mask)
    assert out.tolist() == [1.5, 0.0, 0.0, 0.0, 2.0]
    assert not has_nan
    (out * 3).sum().backward()
    assert values.grad.tolist() == [3.0, 0.0, 0.0, 0.0, 3.0]


def test_masked_finite_clamps_like_torch_clamp():
    raw = [-30.0, -20.0, -5.0, 0.5, 19.0, 20.0, 25.0, INF, -INF]
    values = torch.tensor(raw, requires_grad=True)
    out, _ = masked_finite(values, torch.ones(len(raw)), 20.0)
    assert out.tolist() == [-20.0, -20.0, -5.0, 0.5, 19.0, 20.0, 20.0, 20.0, -20.0]
    out.sum().backward()
    reference = torch.tensor(raw, requires_grad=True)
    reference.clamp(-20.0, 20.0).sum().backward()
    assert values.grad.tolist() == reference.grad.tolist() == [0, 1, 1, 1, 1, 1, 0, 0, 0]


def test_masked_finite_flags_only_unmasked_nans():
    values = torch.tensor([[NAN, 1.0], [2.0, NAN]])
    assert not masked_finite(values, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))[1]
    assert masked_finite(values, torch.tensor([[1.0, 1.0], [1.0, 0.0]]))[1]
    assert not masked_finite(torch.zeros(0, 3), torch.zeros(0, 3))[1]


def test_masked_finite_matches_where_on_random_inputs():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(5, 7, generator=gen, dtype=torch.float64).float() * 30
    mask = (torch.rand(5, 7, generator=gen) > 0.4).float()
    expected = torch.where(mask > 0, values.clamp(-20, 20), 0.0)
    assert torch.equal(masked_finite(values, mask, 20.0)[0], expected)


def test_nan_if():
    assert nan_if(torch.tensor(False)).item() == 0.0
    assert math.isnan(nan_if(torch.tensor(True)).item())
