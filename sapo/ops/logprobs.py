"""Log-probs (and entropy) of the sampled tokens from last hidden states and the lm_head weight, chunked.

The plain path `log_softmax(hidden @ weight.T / T).gather(labels)` materialises N x V logits
(16k tokens x 152k vocabulary = 10 GB in float32). Here the rows are processed in chunks: the forward
keeps only the log-sum-exp per row, and the backward recomputes each chunk's logits, so at most one
chunk of logits is alive at a time. All softmax math is float32 whatever the input dtype.

With z = (hidden @ weight.T + bias) / T, p = softmax(z), lse = logsumexp(z):
    logp_n      = z[n, y_n] - lse_n
    entropy_n   = -sum_v p_v log p_v  (the Triton kernel accumulates the equal lse_n - sum_v p_v z_v)
    d logp_n / d z_n     = onehot(y_n) - p_n
    d entropy_n / d z_n  = -p_n * (log p_n + entropy_n)
    d / d logits = (d / d z) / T;   d hidden = dlogits @ weight;   d weight = dlogits^T @ hidden
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

BACKENDS = ("auto", "torch", "triton")

# Bytes of float32 logits one chunk may hold when chunk_size is not given.
CPU_CHUNK_BYTES = 256 * 2**20
CUDA_CHUNK_BYTES = 1024 * 2**20


@dataclass(frozen=True)
class ChunkKernels:
    """The two per-chunk computations a backend provides (torch here, Triton in triton_logprobs.py).

    stats(hidden_c, weight, bias, labels_c, inv_temperature, with_entropy, keep)
        -> (logp [n] f32, lse [n] f32, entropy [n] f32 | None, kept [n, V] f32 if keep else None);
        `kept` lets dlogits skip the recompute: the softmax p (torch) or the logits z (Triton).
    dlogits(hidden_c, weight, bias, labels_c, lse, grad_logp, grad_entropy, entropy, inv_temperature, kept)
        -> dL/dlogits [n, V] (float32 on the torch path, the weight's dtype on the Triton path); recomputes
        the chunk's logits unless `kept` is given, which it may overwrite.
    prepare(weight, bias) -> (weight, bias) as the kernels want them (the torch path upcasts to float32).
    """

    name: str
    prepare: Callable
    stats: Callable
    dlogits: Callable


# ----------------------------------------------------------------------------------------------------------
# torch backend (the CPU default, and the CUDA fallback without triton)


def _torch_prepare(weight: torch.Tensor, bias: torch.Tensor | None):
    # float32 logits from bf16 weights: upcast once per call (V x d x 4 bytes), not per chunk.
    return weight.float(), None if bias is None else bias.float()


def _torch_logits(hidden_c, weight, bias, inv_temperature) -> torch.Tensor:
    logits = hidden_c.float() @ weight.T  # [n, V] float32
    if bias is not None:
        logits += bias
    if inv_temperature != 1.0:
        logits *= inv_temperature
    return logits  # z = logits / T


def _torch_stats(hidden_c, weight, bias, labels_c, inv_temperature, with_entropy, keep=False):
    z = _torch_logits(hidden_c, weight, bias, inv_temperature)  # [n, V]
    label_z = z.gather(1, labels_c[:, None]).squeeze(1)  # [n]
    top = z.amax(dim=-1)  # [n]
    probs = z.sub_(top[:, None]).exp_()  # [n, V] in place: e^(z - max); one [n, V] buffer in all
    sumexp = probs.sum(-1)  # [n]
    lse = top + sumexp.log()
    entropy = None
    if keep or with_entropy:
        probs.div_(sumexp[:, None])  # softmax p
    if with_entropy:
        entropy = -torch.special.xlogy(probs, probs).sum(-1)  # H = -sum p log p (p = 0 adds 0)
    return label_z - lse, lse, entropy, probs if keep else None


def _torch_dlogits(
    hidden_c, weight, bias, labels_c, lse, grad_logp, grad_entropy, entropy, inv_temperature, kept=None
):
    # dL/dlogits = (dL/dz) / T: fold 1/T into the per-row factors instead of a pass over [n, V]
    g = None if grad_logp is None else grad_logp * inv_temperature  # [n]
    g_h = None if grad_entropy is None else grad_entropy * inv_temperature  # [n]
    if kept is not None:  # the softmax _torch_stats kept (fused loss: no entropy gradient)
        dz = kept.mul_(-g[:, None])  # -g p, in place
    else:
        z = _torch_logits(hidden_c, weight, bias, inv_temperature)  # [n, V]
        log_p = z.sub_(lse[:, None])  # [n, V] in place: log softmax
        if g_h is None:
            dz = log_p.exp_().mul_(-g[:, None])  # -g p, in place
        else:
            p = torch.exp(log_p)  # [n, V]
            dz = log_p.add_(entropy[:, None]).mul_(p).mul_(-g_h[:, None])  # g_H dH/dz = -g_H p (log p + H)
            if g is not None:
                dz.addcmul_(p, g[:, None], value=-1.0)  # - g p
            del p
    if g is not None:
        dz[torch.arange(dz.shape[0], device=dz.device), labels_c] += g  # + g onehot
    return dz


TORCH_KERNELS = ChunkKernels("torch", _torch_prepare, _torch_stats, _torch_dlogits)


def select_kernels(device: torch.device, backend: str = "auto") -> ChunkKernels:
    """Triton when the tensors are on CUDA and triton imports (or when asked for), plain PyTorch otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not allowed; allowed: {', '.join(BACKENDS)}")
    if backend == "torch":
        return TORCH_KERNELS
    if backend == "auto" and device.type != "cuda":
        return TORCH_KERNELS
    try:
        from sapo.ops import triton_logprobs
    except ImportError:
        if backend == "triton":
            raise ImportError("backend='triton' needs the triton package: pip install triton") from None
        return TORCH_KERNELS
    return triton_logprobs.TRITON_KERNELS


# ----------------------------------------------------------------------------------------------------------
# shared helpers


def check_inputs(hidden, weight, labels, bias) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected hidden [N, d] and weight [V, d] with the same d, got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}; flatten [B, T, d] hidden states with hidden.reshape(-1, d)"
        )
    if labels.shape != hidden.shape[:1] or labels.dtype != torch.long:
        raise ValueError(
            f"labels must be a long tensor of shape [N] = [{hidden.shape[0]}], got {labels.dtype} "
            f"{tuple(labels.shape)}"
        )
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16) or weight.dtype != hidden.dtype:
        raise ValueError(
            f"hidden and weight must share one of float32, bfloat16, float16; got {hidden.dtype} and {weight.dtype}"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must have shape [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    # One host sync; the Triton kernel would otherwise return a wrong log-prob for an id outside [0, V).
    if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < weight.shape[0]):
        raise ValueError(
            f"labels must lie in [0, V) = [0, {weight.shape[0]}), got min {int(labels.min())} max "
            f"{int(labels.max())}; put any valid id (e.g. 0) at padded positions (-100) and mask them in the loss"
        )


def resolve_chunk_size(chunk_size: int | None, num_rows: int, vocab: int, device: torch.device) -> int:
    """Rows per chunk: the given value, or as many as fit CPU_CHUNK_BYTES / CUDA_CHUNK_BYTES of float32 logits."""
    if chunk_size is not None:
        if not (isinstance(chunk_size, int) and chunk_size > 0):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        return chunk_size
    budget = CUDA_CHUNK_BYTES if device.type == "cuda" else CPU_CHUNK_BYTES
    rows = max(64, budget // (4 * vocab)) // 64 * 64  # a multiple of 64: whole kernel tiles
    return max(1, min(rows, num_rows))


def grad_buffers(hidden, weight, need_hidden, need_weight, need_bias):
    """Gradient buffers: hidden's in its dtype (each row written once), weight's and bias's float32 (summed)."""
    grad_hidden = torch.empty_like(hidden) if need_hidden else None  # [N, d]
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
    grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_bias else None
    return grad_hidden, grad_weight, grad_bias


def accumulate_grads(dlogits, hidden, rows, weight_mm, grad_hidden, grad_weight, grad_bias) -> None:
    """dL/dhidden[rows] = dlogits @ W; dL/dW += dlogits^T @ hidden[rows] and dL/db += sum, in float32."""
    if grad_hidden is not None:
        grad_hidden[rows] = dlogits @ weight_mm  # [n, d]
    if grad_weight is not None:
        hidden_mm = hidden[rows].to(dlogits.dtype)
        if dlogits.dtype == torch.float32:
            grad_weight.addmm_(dlogits.T, hidden_mm)  # [V, d]
        else:
            grad_weight += dlogits.T @ hidden_mm  # bf16 GEMM with fp32 accumulation inside, fp32 sum across chunks
    if grad_bias is not None:
        grad_bias += dlogits.float().sum(0)  # [V]


# ----------------------------------------------------------------------------------------------------------
# autograd


def no_autocast(fn):
    """Run an autograd.Function's forward/backward with autocast off: the logits must stay float32."""

    def wrapped(ctx, *args):
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            return fn(ctx, *args)

    return wrapped


class _ChunkedTokenLogprobs(torch.autograd.Function):
    @staticmethod
    @no_autocast
    def forward(ctx, hidden, weight, bias, labels, temperature, with_entropy, chunk_size, kernels):
        n = hidden.shape[0]
        weight_k, bias_k = kernels.prepare(weight, bias)
        inv_temperature = 1.0 / temperature
        logp = hidden.new_empty(n, dtype=torch.float32)  # [N]
        lse = hidden.new_empty(n, dtype=torch.float32)  # [N]
        entropy = hidden.new_empty(n, dtype=torch.float32) if with_entropy else None  # [N]
        for start in range(0, n, chunk_size):
            rows = slice(start, min(start + chunk_size, n))
            logp_c, lse_c, ent_c, _ = kernels.stats(
                hidden[rows], weight_k, bias_k, labels[rows], inv_temperature, with_entropy, False
            )
            logp[rows], lse[rows] = logp_c, lse_c
            if with_entropy:
                entropy[rows] = ent_c
        ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
        ctx.inv_temperature, ctx.chunk_size, ctx.kernels = inv_temperature, chunk_size, kernels
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    @no_autocast
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
        kernels = ctx.kernels
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if grad_logp is None and grad_entropy is None:
            return (None,) * 8
        weight_k, bias_k = kernels.prepare(weight, bias)
        grad_hidden, grad_weight, grad_bias = grad_buffers(hidden, weight, need_h, need_w, need_b)
        n = hidden.shape[0]
        for start in range(0, n, ctx.chunk_size):
            rows = slice(start, min(start + ctx.chunk_size, n))
            dlogits = kernels.dlogits(
                hidden[rows],
                weight_k,
                bias_k,
                labels[rows],
                lse[rows],
                None if grad_logp is None else grad_logp[rows].float(),
                None if grad_entropy is None else grad_entropy[rows].float(),
                None if entropy is None else entropy[rows],
                ctx.inv_temperature,
            )
            accumulate_grads(dlogits, hidden, rows, weight_k, grad_hidden, grad_weight, grad_bias)
            del dlogits
        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: int | None = None,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax((hidden @ weight.T + bias) / temperature)[n, labels[n]] without the [N, V] logits.

    hidden [N, d], weight [V, d] (float32, bfloat16 or float16, same dtype), labels [N] long in [0, V),
    bias [V] or None. Returns logprobs [N] float32 and, with `with_entropy`, the entropy [N] float32 of the
    same tempered distribution (else None). Both are differentiable in hidden, weight and bias; the backward
    recomputes each chunk's logits. `temperature` is the sampling temperature (logits are divided by it).
    chunk_size: rows per chunk (default: 256 MiB of float32 logits on CPU, 1 GiB on CUDA).
    backend: "auto" (Triton on CUDA when triton imports, else PyTorch), "torch" or "triton".
    Memory beyond the inputs: one chunk of float32 logits, the float32 [V, d] weight gradient, and on the
    PyTorch path with bf16/fp16 weights a float32 copy of the weight (logits must not be rounded to bf16).
    """
    check_inputs(hidden, weight, labels, bias)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    kernels = select_kernels(hidden.device, backend)
    chunk = resolve_chunk_size(chunk_size, hidden.shape[0], weight.shape[0], hidden.device)
    return _ChunkedTokenLogprobs.apply(
        hidden, weight, bias, labels, float(temperature), bool(with_entropy), chunk, kernels
    )
