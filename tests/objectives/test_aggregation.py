import pytest
import torch

from sapo.objectives import aggregation_weights, resolve
from sapo.objectives.aggregation import sequence_weights

MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)  # |y| = 3, 1, 0; B = 3


def test_seq_mean_token_mean_weights():
    weights = aggregation_weights(MASK, resolve("sapo"))
    expected = torch.tensor([[1 / 9, 1 / 9, 1 / 9, 0], [1 / 3, 0, 0, 0], [0, 0, 0, 0]])
    assert weights.dtype == torch.float32
    assert torch.allclose(weights, expected)


def test_token_mean_weights_use_the_token_count():
    weights = aggregation_weights(MASK, resolve("dapo"))
    assert torch.allclose(weights, MASK.float() / 4)
    assert torch.allclose(aggregation_weights(MASK, resolve("dapo"), num_tokens=10), MASK.float() / 10)


def test_dr_grpo_weights_use_the_constant_not_the_padded_width():
    weights = aggregation_weights(MASK, resolve("dr_grpo", max_completion_length=16))
    assert torch.allclose(weights, MASK.float() / (3 * 16))
    global_weights = aggregation_weights(MASK, resolve("dr_grpo", max_completion_length=16), num_sequences=6)
    assert torch.allclose(global_weights, MASK.float() / (6 * 16))


def test_seq_mean_weights_are_per_sequence_and_skip_empty_rows():
    assert torch.allclose(sequence_weights(MASK), torch.tensor([1 / 3, 1 / 3, 0]))
    assert torch.allclose(sequence_weights(MASK, num_sequences=6), torch.tensor([1 / 6, 1 / 6, 0]))
    # The token form for seq_mean spreads each sequence's weight over its tokens (no length weighting).
    token_form = aggregation_weights(MASK, resolve("gspo"))
    assert torch.allclose(token_form.sum(-1), sequence_weights(MASK))


def test_float_mask_and_tensor_normalisers():
    weights = aggregation_weights(MASK.float(), resolve("sapo"), num_sequences=torch.tensor(6))
    assert torch.allclose(weights, aggregation_weights(MASK, resolve("sapo"), num_sequences=6))


def test_empty_batch_gives_zero_weights():
    empty = torch.zeros(2, 3, dtype=torch.bool)
    for name, options in (("sapo", {}), ("dapo", {}), ("dr_grpo", {"max_completion_length": 4})):
        assert aggregation_weights(empty, resolve(name, **options)).abs().sum() == 0


def test_negative_normaliser_is_rejected():
    with pytest.raises(ValueError, match="num_tokens"):
        aggregation_weights(MASK, resolve("dapo"), num_tokens=-1)
