import sys

import pytest
import torch

import sapo.ops
from sapo.ops import token_logprobs
from sapo.ops.logprobs import TORCH_KERNELS, resolve_chunk_size, select_kernels


def make_inputs(n=37, d=16, vocab=50, dtype=torch.float32, seed=0, bias=False):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen).to(dtype)  # [N, d]
    weight = (torch.randn(vocab, d, generator=gen) / 2).to(dtype)  # [V, d]
    labels = torch.randint(0, vocab, (n,), generator=gen)  # [N]
    bias_t = torch.randn(vocab, generator=gen) if bias else None  # [V]
    return hidden, weight, labels, bias_t


def leaves(*tensors, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_(True) for t in tensors]


def run_both(plain, hidden, weight, labels, bias, temperature, chunk_size, grad_logp, grad_entropy):
    """(outputs, grads) of token_logprobs and of the float64 plain path, for one upstream gradient."""
    h, w, b = leaves(hidden, weight, bias)
    logp, entropy = token_logprobs(
        h, w, labels, temperature=temperature, with_entropy=True, chunk_size=chunk_size, bias=b
    )
    (logp * grad_logp + entropy * grad_entropy).sum().backward()
    h64, w64, b64 = leaves(hidden, weight, bias, dtype=torch.float64)
    logp64, entropy64 = plain(h64, w64, labels, temperature, b64)
    (logp64 * grad_logp + entropy64 * grad_entropy).sum().backward()
    ours = [logp, entropy, h.grad, w.grad] + ([b.grad] if b is not None else [])
    ref = [logp64, entropy64, h64.grad, w64.grad] + ([b64.grad] if b64 is not None else [])
    return ours, ref


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 37, 64])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fp32_matches_plain_path_values_and_grads(plain, chunk_size, temperature, with_bias):
    hidden, weight, labels, bias = make_inputs(bias=with_bias)
    gen = torch.Generator().manual_seed(1)
    grad_logp, grad_entropy = torch.randn(37, generator=gen), torch.randn(37, generator=gen)
    ours, ref = run_both(plain, hidden, weight, labels, bias, temperature, chunk_size, grad_logp, grad_entropy)
    for name, a, b in zip(["logp", "entropy", "d hidden", "d weight", "d bias"], ours, ref):
        assert a.dtype == (torch.float32 if name in ("logp", "entropy") else hidden.dtype)
        torch.testing.assert_close(a.double(), b.detach(), rtol=1e-5, atol=5e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_outputs_are_float32_and_entropy_none_by_default():
    hidden, weight, labels, _ = make_inputs(dtype=torch.bfloat16)
    logp, entropy = token_logprobs(hidden, weight, labels)
    assert logp.dtype == torch.float32 and logp.shape == (37,) and entropy is None
    assert (logp <= 0).all()


def test_bf16_uses_fp32_logits_of_the_bf16_values(plain):
    """bf16 in: logits are computed in float32 from the bf16 values (no bf16 rounding of logits)."""
    hidden, weight, labels, _ = make_inputs(dtype=torch.bfloat16, d=64, vocab=300)
    h, w = leaves(hidden, weight)
    logp, entropy = token_logprobs(h, w, labels, with_entropy=True, chunk_size=10, temperature=0.8)
    (logp.sum() + entropy.sum()).backward()
    h64, w64 = leaves(hidden, weight, dtype=torch.float64)
    logp64, entropy64 = plain(h64, w64, labels, 0.8)
    (logp64.sum() + entropy64.sum()).backward()
    torch.testing.assert_close(logp.double(), logp64.detach(), rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(entropy.double(), entropy64.detach(), rtol=1e-5, atol=5e-5)
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    # gradients: exact up to the final rounding to bf16 (relative 2^-8)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-2, atol=1e-2)
    # and loosely equal to the all-bf16 plain path a model would run
    logp_bf16, _ = plain(hidden, weight, labels, 0.8)
    torch.testing.assert_close(logp, logp_bf16.float(), rtol=0.05, atol=0.3)


@pytest.mark.parametrize("use", ["logp", "entropy"])
def test_one_output_used_gives_its_gradient_only(plain, use):
    hidden, weight, labels, _ = make_inputs()
    zeros = torch.zeros(37)
    ones = torch.ones(37)
    grad_logp, grad_entropy = (ones, zeros) if use == "logp" else (zeros, ones)
    h, w = leaves(hidden, weight)
    logp, entropy = token_logprobs(h, w, labels, with_entropy=True, chunk_size=8)
    (logp if use == "logp" else entropy).sum().backward()  # the other output gets no gradient (None)
    _, ref = run_both(plain, hidden, weight, labels, None, 1.0, 8, grad_logp, grad_entropy)
    torch.testing.assert_close(h.grad.double(), ref[2], rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(w.grad.double(), ref[3], rtol=1e-5, atol=2e-5)


def test_frozen_weight_gets_no_gradient_and_hidden_grad_is_right(plain):
    hidden, weight, labels, _ = make_inputs()
    (h,) = leaves(hidden)
    logp, _ = token_logprobs(h, weight, labels, chunk_size=5)
    logp.sum().backward()
    assert weight.grad is None
    _, ref = run_both(plain, hidden, weight, labels, None, 1.0, 5, torch.ones(37), torch.zeros(37))
    torch.testing.assert_close(h.grad.double(), ref[2], rtol=1e-5, atol=2e-5)


def test_autocast_does_not_round_the_logits():
    """Under bf16 autocast the chunk matmuls still run in float32: results equal those without autocast."""
    hidden, weight, labels, _ = make_inputs()
    results = []
    for autocast in (False, True):
        h, w = leaves(hidden, weight)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logp, entropy = token_logprobs(h, w, labels, with_entropy=True, chunk_size=8)
        (logp.sum() + entropy.sum()).backward()
        results.append([logp, entropy, h.grad, w.grad])
    for plain_value, autocast_value in zip(*results):
        torch.testing.assert_close(autocast_value, plain_value, rtol=0, atol=0)


def test_never_saves_full_logits_for_backward():
    """Only [N]-sized tensors and the inputs are kept between forward and backward."""
    hidden, weight, labels, _ = make_inputs(n=40, vocab=64)
    h, w = leaves(hidden, weight)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        logp, entropy = token_logprobs(h, w, labels, with_entropy=True, chunk_size=8)
    assert (40, 64) not in saved
    assert set(saved) <= {(40, 16), (64, 16), (40,)}


def test_kernel_selection_and_chunk_size():
    assert select_kernels(torch.device("cpu")) is TORCH_KERNELS
    assert select_kernels(torch.device("cpu"), "torch") is TORCH_KERNELS
    assert resolve_chunk_size(None, 100_000, 151_936, torch.device("cpu")) == 384  # 256 MiB of fp32 rows
    assert resolve_chunk_size(None, 10, 151_936, torch.device("cpu")) == 10
    assert resolve_chunk_size(None, 100_000, 10**7, torch.device("cpu")) == 64
    assert resolve_chunk_size(5, 100, 10, torch.device("cpu")) == 5


def test_works_without_triton(monkeypatch):
    """Without triton, CUDA tensors fall back to PyTorch and backend='triton' says what to install."""
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton now raises ImportError
    monkeypatch.delitem(sys.modules, "sapo.ops.triton_logprobs", raising=False)
    monkeypatch.delattr(sapo.ops, "triton_logprobs", raising=False)
    assert select_kernels(torch.device("cuda")) is TORCH_KERNELS
    with pytest.raises(ImportError, match="pip install triton"):
        select_kernels(torch.device("cpu"), "triton")


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(labels=torch.zeros(37, dtype=torch.int32)), "labels must be a long tensor"),
        (dict(labels=torch.zeros(36, dtype=torch.long)), "labels must be a long tensor"),
        (dict(weight=torch.zeros(50, 15)), "same d"),
        (dict(hidden=torch.zeros(37, 16, dtype=torch.float64), weight=torch.zeros(50, 16, dtype=torch.float64)),
         "float32, bfloat16, float16"),
        (dict(bias=torch.zeros(49)), "bias must have shape"),
        (dict(labels=torch.full((37,), -100)), r"labels must lie in \[0, V\)"),
        (dict(labels=torch.full((37,), 50)), r"labels must lie in \[0, V\)"),
        (dict(temperature=0.0), "temperature must be > 0"),
        (dict(chunk_size=0), "chunk_size must be a positive int"),
        (dict(backend="cuda"), "backend='cuda' is not allowed"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, message):
    hidden, weight, labels, _ = make_inputs()
    kwargs = dict(hidden=hidden, weight=weight, labels=labels) | change
    with pytest.raises(ValueError, match=message):
        token_logprobs(kwargs.pop("hidden"), kwargs.pop("weight"), kwargs.pop("labels"), **kwargs)
