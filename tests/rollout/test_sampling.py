import torch

from sapo.rollout import filter_logits, sample_tokens


def test_top_k_keeps_k_largest_and_ties():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5], [2.0, 2.0, 1.0, 2.0]])
    out = filter_logits(logits, top_k=2)
    assert torch.isinf(out).tolist() == [[True, False, False, True], [False, False, True, False]]


def test_top_p_keeps_smallest_set_reaching_mass():
    probs = torch.tensor([[0.5, 0.1, 0.3, 0.1]])
    logits = probs.log()
    # Sorted: 0.5, 0.3, 0.1, 0.1 -> mass before each: 0, 0.5, 0.8, 0.9.
    assert torch.isfinite(filter_logits(logits, top_p=0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.6)).tolist() == [[True, False, True, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.85)).sum().item() == 3
    assert torch.isfinite(filter_logits(logits, top_p=0.01)).tolist() == [[True, False, False, False]]


def test_no_filter_is_identity():
    logits = torch.randn(3, 10)
    assert torch.equal(filter_logits(logits, top_k=0, top_p=1.0), logits)
    assert torch.equal(filter_logits(logits, top_k=10), logits)


def test_greedy_and_logprob():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    tokens, logprobs = sample_tokens(logits, temperature=0.5, greedy=True)
    assert tokens.tolist() == [1, 0]
    expected = torch.log_softmax(logits / 0.5, dim=-1)[[0, 1], [1, 0]]
    torch.testing.assert_close(logprobs, expected)


def test_sampling_frequencies_match_softmax():
    torch.manual_seed(0)
    logits = torch.randn(1, 12) * 2
    n = 20000
    tokens, logprobs = sample_tokens(
        logits.expand(n, -1), temperature=0.8, generator=torch.Generator().manual_seed(3)
    )
    probs = torch.softmax(logits[0] / 0.8, dim=-1)
    freqs = torch.bincount(tokens, minlength=12).double() / n
    # Binomial standard error is at most 0.0036 here; 5 sigma.
    assert (freqs - probs.double()).abs().max() < 0.018
    torch.testing.assert_close(logprobs, torch.log_softmax(logits / 0.8, -1)[0, tokens])


def test_filtered_sampling_stays_in_set_and_renormalises():
    torch.manual_seed(1)
    logits = torch.randn(1, 20)
    n = 20000
    tokens, _ = sample_tokens(logits.expand(n, -1), top_k=5, top_p=0.7,
                              generator=torch.Generator().manual_seed(4))
    kept = filter_logits(logits, top_k=5, top_p=0.7)[0]
    allowed = torch.isfinite(kept)
    assert allowed[tokens].all()
    freqs = torch.bincount(tokens, minlength=20).double() / n
    assert (freqs - torch.softmax(kept, -1).double()).abs().max() < 0.018


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(50, 30)
    a, _ = sample_tokens(logits, generator=torch.Generator().manual_seed(7))
    b, _ = sample_tokens(logits, generator=torch.Generator().manual_seed(7))
    c, _ = sample_tokens(logits, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
