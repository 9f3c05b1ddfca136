"""The Triton kernels against the float64 plain path: compiled on CUDA, under TRITON_INTERPRET=1 on CPU
(tests/ops/conftest.py sets the flag before triton is imported)."""

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
triton = pytest.importorskip("triton")
if DEVICE == "cpu":
    from triton.runtime.interpreter import InterpretedFunction

    # triton's own @jit helpers (tl.zeros, tl.sum, tl.max) are decorated when triton is imported: if that
    # happened before TRITON_INTERPRET=1 was set (another test imported transformers, which imports triton),
    # interpreted kernels cannot call them. The flag then belongs in tests/conftest.py.
    if os.environ.get("TRITON_INTERPRET") != "1" or not isinstance(triton.language.standard.sum, InterpretedFunction):
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)

from sapo.objectives import aggregation_weights, policy_loss, resolve  # noqa: E402
from sapo.ops import (  # noqa: E402
    fused_token_policy_loss,
    token_logprobs,
    triton_logprobs,  # noqa: E402
)
from sapo.ops.logprobs import select_kernels  # noqa: E402


def make_inputs(n, d, vocab, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen).to(dtype)  # [N, d]
    weight = (torch.randn(vocab, d, generator=gen) / 2).to(dtype)  # [V, d]
    labels = torch.randint(0, vocab, (n,), generator=gen)  # [N]
    bias = torch.randn(vocab, generator=gen)  # [V]
    return [t.to(DEVICE) for t in (hidden, weight, labels, bias)]


def plain64(hidden, weight, labels, temperature, bias):
    h = hidden.double().requires_grad_(True)
    w = weight.double().requires_grad_(True)
    b = None if bias is None else bias.double().requires_grad_(True)
    logits = h @ w.T + (0 if b is None else b)  # [N, V]
    log_probs = torch.log_softmax(logits / temperature, -1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return log_probs.gather(1, labels[:, None]).squeeze(1), entropy, (h, w, b)


def test_triton_is_selected_when_asked_and_on_cuda():
    assert select_kernels(torch.device(DEVICE), "triton") is triton_logprobs.TRITON_KERNELS
    assert select_kernels(torch.device("cuda"), "auto") is triton_logprobs.TRITON_KERNELS


# N, d, V not multiples of the tiles (16 x 32 x 16 in the interpreter); several vocabulary slices.
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 5e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("with_bias, temperature, chunk_size", [(False, 1.0, None), (True, 0.7, 20)])
def test_token_logprobs_triton_matches_plain(dtype, tol, with_bias, temperature, chunk_size):
    hidden, weight, labels, bias = make_inputs(37, 24, 100, dtype)
    bias = bias if with_bias else None
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    b = None if bias is None else bias.clone().requires_grad_(True)
    logp, entropy = token_logprobs(h, w, labels, temperature=temperature, with_entropy=True,
                                   chunk_size=chunk_size, bias=b, backend="triton")
    gen = torch.Generator().manual_seed(3)
    g_logp, g_ent = (torch.randn(37, generator=gen).to(DEVICE) for _ in range(2))
    (logp * g_logp + entropy * g_ent).sum().backward()
    ref_logp, ref_entropy, (h64, w64, b64) = plain64(hidden, weight, labels, temperature, bias)
    (ref_logp * g_logp + ref_entropy * g_ent).sum().backward()
    # logits are float32 from the (bf16) input values: log-probs stay tight even for bf16 inputs
    torch.testing.assert_close(logp.double(), ref_logp.detach(), rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(entropy.double(), ref_entropy.detach(), rtol=1e-5, atol=5e-5)
    # gradients: bf16 dlogits and bf16 outputs in the bf16 case
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=tol, atol=tol)
    if b is not None:
        torch.testing.assert_close(b.grad.double(), b64.grad, rtol=tol, atol=tol)


def test_stats_kernel_merges_vocabulary_slices():
    """Small N gives several vocabulary slices per row block; the merged lse equals torch.logsumexp."""
    hidden, weight, labels, _ = make_inputs(5, 16, 130, torch.float32)
    logp, lse, entropy, logits = triton_logprobs._stats(hidden, weight, None, labels, 1.0, True, True)
    ref = hidden @ weight.T  # [5, 130]
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, torch.logsumexp(ref, -1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logp, torch.log_softmax(ref, -1).gather(1, labels[:, None])[:, 0])


@pytest.mark.parametrize("loss_type", ["sapo", "cispo"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fused_loss_triton_matches_plain_policy_loss(loss_type, dtype, tol):
    n_rows, n_cols = 3, 11
    hidden, weight, labels, _ = make_inputs(n_rows * n_cols, 24, 100, dtype)
    gen = torch.Generator().manual_seed(1)
    mask = (torch.rand(n_rows, n_cols, generator=gen) > 0.2).to(DEVICE)
    advantages = torch.randn(n_rows, generator=gen).to(DEVICE)
    ref_logp, _, (h64, w64, _) = plain64(hidden, weight, labels, 0.9, None)
    old = (ref_logp.detach() + 0.3 * torch.randn(n_rows * n_cols, generator=gen, dtype=torch.float64).to(DEVICE))
    old = old.float().view(n_rows, n_cols)
    ref_loss, _ = policy_loss(ref_logp.view(n_rows, n_cols), old, advantages, mask, loss_type, with_metrics=False)
    ref_loss.backward()
    spec = resolve(loss_type)
    token_weights = aggregation_weights(mask, spec).reshape(-1)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss, logp, _ = fused_token_policy_loss(
        h, w, labels, old.reshape(-1), advantages[:, None].expand(n_rows, n_cols).reshape(-1), token_weights,
        spec, temperature=0.9, chunk_size=16, backend="triton",
    )
    loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss.detach().double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logp.double(), ref_logp.detach(), rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=tol, atol=tol * 0.1)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=tol, atol=tol * 0.1)
