import math

import pytest

from sapo.evaluate import pass_at_k, summarize


def _brute(n, c, k):
    return 1 - math.comb(n - c, k) / math.comb(n, k)


@pytest.mark.parametrize("n,c,k", [(8, 0, 1), (8, 3, 1), (8, 3, 4), (8, 8, 8), (16, 5, 8), (5, 1, 5), (10, 9, 2)])
def test_pass_at_k_matches_binomial_formula(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(_brute(n, c, k), abs=1e-12)


def test_pass_at_1_is_mean_correct():
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)


def test_pass_at_k_bad_input():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 2, 5)


def test_summarize_hand_count():
    # 3 problems x 4 samples: correct counts 0, 2, 4
    correct = [[0, 0, 0, 0], [1, 0, 1, 0], [1, 1, 1, 1]]
    m = summarize(correct, ks=[1, 2, 4])
    assert m["eval/pass@1"] == pytest.approx((0 + 0.5 + 1) / 3)
    # pass@2: problem 2 -> 1 - C(2,2)/C(4,2) = 5/6
    assert m["eval/pass@2"] == pytest.approx((0 + 5 / 6 + 1) / 3)
    assert m["eval/pass@4"] == pytest.approx(2 / 3)
    assert m["eval/num_problems"] == 3 and m["eval/num_samples"] == 4
