import math

import pytest
import torch

from sapo.objectives.sampler_correction import sampler_is_weights

# two rows; row 0 has 3 tokens, row 1 has 2 (the third slot is padding holding NaN)
OLD = torch.log(torch.tensor([[0.5, 0.2, 0.9], [0.3, 0.6, float("nan")]]))
SAMPLER = torch.log(torch.tensor([[0.25, 0.4, 0.9], [0.1, 0.6, 0.5]]))
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
R = torch.tensor([[2.0, 0.5, 1.0], [3.0, 1.0, 0.0]])  # r = pi_old / pi_sampler where unmasked


def _close(a, b):
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=torch.float32), atol=1e-6, rtol=1e-6)


def test_token_truncate_caps_each_ratio():
    w, m = sampler_is_weights(OLD, SAMPLER, MASK, mode="token_truncate", cap=2.5)
    _close(w, [[2.0, 0.5, 1.0], [2.5, 1.0, 0.0]])
    assert m["is/truncated_frac"] == pytest.approx(1 / 5)


def test_token_mask_is_two_sided():
    w, m = sampler_is_weights(OLD, SAMPLER, MASK, mode="token_mask", cap=2.5, min_ratio=0.6)
    _close(w, [[2.0, 0.0, 1.0], [0.0, 1.0, 0.0]])  # 0.5 < 0.6 and 3 > 2.5 are masked
    assert m["is/masked_frac"] == pytest.approx(2 / 5)


def test_sequence_modes_use_the_product_over_the_sequence():
    w, _ = sampler_is_weights(OLD, SAMPLER, MASK, mode="sequence_truncate", cap=2.0)
    _close(w, [[1.0, 1.0, 1.0], [2.0, 2.0, 0.0]])  # R_0 = 2 * 0.5 * 1 = 1, R_1 = 3 -> 2
    w, m = sampler_is_weights(OLD, SAMPLER, MASK, mode="sequence_mask", cap=2.0)
    _close(w, [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])  # row 1 is dropped whole
    assert m["is/masked_frac"] == pytest.approx(2 / 5)


def test_weights_are_detached_finite_and_zero_where_masked():
    old = OLD.clone().requires_grad_(True)
    for mode in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"):
        w, _ = sampler_is_weights(old, SAMPLER, MASK, mode=mode, cap=10.0)
        assert not w.requires_grad and torch.isfinite(w).all() and (w[~MASK] == 0).all()


def test_a_huge_log_ratio_does_not_overflow():
    old = torch.tensor([[0.0] * 200])
    sampler = torch.tensor([[-1.0] * 200])  # R = e^200
    w, _ = sampler_is_weights(old, sampler, torch.ones(1, 200, dtype=torch.bool), mode="sequence_truncate", cap=5.0)
    assert torch.isfinite(w).all() and math.isclose(float(w[0, 0]), 5.0)


def test_bad_arguments_say_what_is_allowed():
    with pytest.raises(ValueError, match="choose one of"):
        sampler_is_weights(OLD, SAMPLER, MASK, mode="tokens", cap=2.0)
    with pytest.raises(ValueError, match="min_ratio < cap"):
        sampler_is_weights(OLD, SAMPLER, MASK, mode="token_mask", cap=2.0, min_ratio=3.0)
