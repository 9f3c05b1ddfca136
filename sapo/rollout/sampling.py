"""Next-token choice from logits: temperature, top-k, top-p (nucleus), sampling and log-probs.

The order matches HF ``generate``: divide by the temperature, then keep the top-k tokens, then keep the
smallest set of most probable tokens whose mass reaches top_p (Holtzman et al., 2020), renormalise, sample.
"""

from __future__ import annotations

import torch


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set the logits of tokens outside the top-k / top-p set to -inf. logits [N, V] (already tempered).

    top_k=0 and top_p=1.0 disable the filters. Ties at the k-th logit are kept (as HF does). top-p keeps
    a token when the mass of the strictly more probable tokens is below top_p, so the most probable
    token is always kept.
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [N, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [N, V]
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [N, V] mass of more probable tokens
        remove_sorted = mass_before >= top_p
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def sample_tokens(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row and return (tokens [N], sampler log-probs [N]).

    The log-prob is log_softmax(logits / temperature) at the chosen token (tempered, unfiltered): see
    ``sapo.rollout.base`` for why. Sampling inverts the CDF: one uniform u per row, token = first j with
    cumsum(p)_j > u * sum(p). It needs N random numbers instead of N * V (an exponential race or
    ``torch.multinomial`` draw per vocabulary entry, 5-20x slower on CPU), no host sync, and never picks
    a zero-probability (filtered) token. The float32 cumsum shifts token probabilities by ~1e-6.
    """
    scaled = logits.float() if temperature == 1.0 else logits.float() / temperature  # [N, V] (x / 1 is x)
    logprobs = torch.log_softmax(scaled, dim=-1)  # [N, V]
    if greedy:
        tokens = scaled.argmax(dim=-1)  # [N]
    else:
        filtered = top_k > 0 or top_p < 1.0
        probs = filter_logits(scaled, top_k, top_p).softmax(dim=-1) if filtered else logprobs.exp()  # [N, V]
        cdf = probs.cumsum(dim=-1)  # [N, V]
        rng_device = generator.device if generator is not None else cdf.device  # a CPU generator may drive a GPU
        u = torch.rand((cdf.shape[0], 1), generator=generator, device=rng_device).to(cdf.device)  # [N, 1]
        tokens = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)  # [N]
        tokens = tokens.clamp(max=cdf.shape[-1] - 1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)
