"""Triton kernels behind token_logprobs / fused_token_policy_loss on CUDA (imported lazily: needs triton).

stats kernel (forward): one program owns BLOCK_N rows and a slice of the vocabulary. It walks the slice in
BLOCK_V tiles; each tile of logits z = hidden @ W_tile^T (tl.dot, float32 accumulator, K loop over d) is
folded into an online log-sum-exp (running max m, running sum s of exp(z - m)), the running sum of
exp(z - m) * z (for the entropy) and the label's logit, then dropped: no logits reach memory unless the
fused loss asks to keep them. Slices (grid axis 1) keep the GPU busy when N is small; their partial
(m, s, t, z_label) are merged on the host:
    M = max_s m_s,  S = sum_s s_s e^(m_s - M),  lse = M + log S,  E_p[z] = sum_s t_s e^(m_s - M) / S,
    logp = z_label - lse,  entropy = lse - E_p[z].
dlogits kernel (backward): one program per (BLOCK_N x BLOCK_V) tile recomputes z (or loads the kept z) and
writes dL/dlogits = (g (onehot - p) - g_H p (log p + H)) / T in the matmul dtype; the two gradient matmuls
(dlogits @ W, dlogits^T @ hidden) then go to cuBLAS through torch.

Correctness is tested on CPU with TRITON_INTERPRET=1 at small shapes. Speed on H100 is not measured yet:
the tile sizes (64 x 128 x 64, bf16 tl.dot with float32 accumulation, 8 warps, 3 stages) follow the usual
GEMM choices for Hopper, untuned.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from sapo.ops.logprobs import ChunkKernels


@triton.jit
def _logits_tile(
    hidden_ptr, weight_ptr, bias_ptr, rows, row_ok, cols, col_ok, D, inv_temperature,
    stride_hn, stride_hd, stride_wv, stride_wd,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """z = (hidden[rows] @ weight[cols]^T + bias[cols]) / T as a [BLOCK_N, BLOCK_V] float32 tile.

    Row and column offsets are widened to int64: a chunk of logits can pass 2^31 elements."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ks = d0 + tl.arange(0, BLOCK_D)
        k_ok = ks < D
        h = tl.load(hidden_ptr + rows[:, None].to(tl.int64) * stride_hn + ks[None, :] * stride_hd,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        w = tl.load(weight_ptr + cols[None, :].to(tl.int64) * stride_wv + ks[:, None] * stride_wd,
                    mask=col_ok[None, :] & k_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_V]
        # The interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584): upcast there.
        if DOT_UPCAST:  # bf16 -> fp32 is exact, and the accumulator is fp32 either way
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc * inv_temperature


@triton.jit
def _stats_kernel(
    hidden_ptr, weight_ptr, bias_ptr, labels_ptr, logits_ptr,
    max_ptr, sumexp_ptr, zsum_ptr, label_ptr,  # partials [S, N] float32
    N, V, D, cols_per_split, inv_temperature,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_zn,
    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, STORE_LOGITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    row_ok = rows < N
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    run_max = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    run_zsum = tl.zeros([BLOCK_N], dtype=tl.float32)
    label_z = tl.zeros([BLOCK_N], dtype=tl.float32)
    v_begin = pid_s * cols_per_split
    v_end = tl.minimum(v_begin + cols_per_split, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)  # [BLOCK_V]
        col_ok = cols < v_end
        z = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, row_ok, cols, col_ok, D, inv_temperature,
                         stride_hn, stride_hd, stride_wv, stride_wd,
                         HAS_BIAS, DOT_PRECISION, DOT_UPCAST, BLOCK_N, BLOCK_V, BLOCK_D)  # [BLOCK_N, BLOCK_V]
        if STORE_LOGITS:
            tl.store(logits_ptr + rows[:, None].to(tl.int64) * stride_zn + cols[None, :], z,
                     mask=row_ok[:, None] & col_ok[None, :])
        z = tl.where(col_ok[None, :], z, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        rescale = tl.exp(run_max - new_max)  # 0 on the first tile (run_max = -inf)
        e = tl.exp(z - new_max[:, None])  # 0 on padding columns
        run_sum = run_sum * rescale + tl.sum(e, axis=1)
        if WITH_ENTROPY:
            run_zsum = run_zsum * rescale + tl.sum(e * tl.where(col_ok[None, :], z, 0.0), axis=1)
        label_z += tl.sum(tl.where(cols[None, :] == labels[:, None], z, 0.0), axis=1)
        run_max = new_max
    out = pid_s * N + rows
    tl.store(max_ptr + out, run_max, mask=row_ok)
    tl.store(sumexp_ptr + out, run_sum, mask=row_ok)
    tl.store(label_ptr + out, label_z, mask=row_ok)
    if WITH_ENTROPY:
        tl.store(zsum_ptr + out, run_zsum, mask=row_ok)


@triton.jit
def _dlogits_kernel(
    hidden_ptr, weight_ptr, bias_ptr, labels_ptr, lse_ptr, grad_logp_ptr, grad_entropy_ptr, entropy_ptr,
    logits_ptr, out_ptr,
    N, V, D, inv_temperature,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_zn, stride_on,
    HAS_BIAS: tl.constexpr, HAS_GRAD_LOGP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
    RECOMPUTE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)  # row blocks vary fastest: neighbouring programs share the weight tile in L2
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < V
    tile_ok = row_ok[:, None] & col_ok[None, :]
    if RECOMPUTE:
        z = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, row_ok, cols, col_ok, D, inv_temperature,
                         stride_hn, stride_hd, stride_wv, stride_wd,
                         HAS_BIAS, DOT_PRECISION, DOT_UPCAST, BLOCK_N, BLOCK_V, BLOCK_D)
    else:
        z = tl.load(logits_ptr + rows[:, None].to(tl.int64) * stride_zn + cols[None, :], mask=tile_ok, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    log_p = z - lse[:, None]  # [BLOCK_N, BLOCK_V]
    p = tl.exp(log_p)
    dz = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    if HAS_GRAD_LOGP:
        g = tl.load(grad_logp_ptr + rows, mask=row_ok, other=0.0)
        labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
        dz += tl.where(cols[None, :] == labels[:, None], g[:, None], 0.0) - g[:, None] * p  # g (onehot - p)
    if HAS_GRAD_ENTROPY:
        g_h = tl.load(grad_entropy_ptr + rows, mask=row_ok, other=0.0)
        entropy = tl.load(entropy_ptr + rows, mask=row_ok, other=0.0)
        dz -= g_h[:, None] * p * (log_p + entropy[:, None])  # g_H dH/dz
    dz = dz * inv_temperature
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_on + cols[None, :], dz.to(out_ptr.dtype.element_ty), mask=tile_ok)


# ----------------------------------------------------------------------------------------------------------
# host side


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _config(dtype: torch.dtype) -> dict:
    if _interpreted():  # smallest tiles tl.dot accepts: the interpreter runs them in numpy
        return dict(BLOCK_N=16, BLOCK_V=32, BLOCK_D=16)
    if dtype == torch.float32:
        return dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=2)
    return dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3)


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs: follow torch's TF32 switch; bf16/fp16 inputs ignore the setting.
    if dtype == torch.float32 and not _interpreted() and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _num_splits(row_blocks: int, vocab_tiles: int, device: torch.device) -> int:
    """Vocabulary slices per row block: enough programs for two waves over the SMs."""
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 8  # interpreter: several slices, to exercise the merge of partial results
    return max(1, min(vocab_tiles, triton.cdiv(target, row_blocks)))


def _prepare(weight: torch.Tensor, bias: torch.Tensor | None):
    return weight, None if bias is None else bias.float().contiguous()


def _stats(hidden_c, weight, bias, labels_c, inv_temperature, with_entropy, keep=False):
    n, d = hidden_c.shape
    vocab = weight.shape[0]
    config = _config(weight.dtype)
    block_n, block_v = config["BLOCK_N"], config["BLOCK_V"]
    row_blocks, vocab_tiles = triton.cdiv(n, block_n), triton.cdiv(vocab, block_v)
    splits = _num_splits(row_blocks, vocab_tiles, hidden_c.device)
    cols_per_split = triton.cdiv(vocab_tiles, splits) * block_v
    splits = triton.cdiv(vocab, cols_per_split)
    partial = torch.empty(4, splits, n, dtype=torch.float32, device=hidden_c.device)  # m, s, t, z_label
    logits = torch.empty(n, vocab, dtype=torch.float32, device=hidden_c.device) if keep else partial
    labels_c = labels_c.contiguous()
    _stats_kernel[(row_blocks, splits)](
        hidden_c, weight, bias if bias is not None else partial, labels_c, logits,
        partial[0], partial[1], partial[2], partial[3],
        n, vocab, d, cols_per_split, inv_temperature,
        hidden_c.stride(0), hidden_c.stride(1), weight.stride(0), weight.stride(1),
        logits.stride(0) if keep else 0,
        HAS_BIAS=bias is not None, WITH_ENTROPY=with_entropy, STORE_LOGITS=keep,
        DOT_PRECISION=_dot_precision(weight.dtype), DOT_UPCAST=_interpreted(), **config,
    )
    run_max, run_sum, run_zsum, label_z = partial  # [S, n] each
    top = run_max.max(0).values  # [n]
    rescale = torch.exp(run_max - top)  # [S, n]
    sumexp = (run_sum * rescale).sum(0)  # [n]
    lse = top + torch.log(sumexp)
    logp = label_z.sum(0) - lse  # the label lies in exactly one slice
    entropy = lse - (run_zsum * rescale).sum(0) / sumexp if with_entropy else None
    return logp, lse, entropy, logits if keep else None


def _dlogits(hidden_c, weight, bias, labels_c, lse, grad_logp, grad_entropy, entropy, inv_temperature, kept=None):
    logits = kept  # the logits z that _stats stored
    n, d = hidden_c.shape
    vocab = weight.shape[0]
    config = _config(weight.dtype)
    recompute = logits is None
    if not recompute and weight.dtype == torch.float32:
        out = logits  # overwrite the kept logits tile by tile
    else:
        out = torch.empty(n, vocab, dtype=weight.dtype, device=hidden_c.device)
    logits_arg = out if recompute else logits
    dummy = lse
    grid = (triton.cdiv(n, config["BLOCK_N"]), triton.cdiv(vocab, config["BLOCK_V"]))
    _dlogits_kernel[grid](
        hidden_c, weight, bias if bias is not None else dummy, labels_c.contiguous(), lse.contiguous(),
        grad_logp.contiguous() if grad_logp is not None else dummy,
        grad_entropy.contiguous() if grad_entropy is not None else dummy,
        entropy.contiguous() if entropy is not None else dummy,
        logits_arg, out,
        n, vocab, d, inv_temperature,
        hidden_c.stride(0), hidden_c.stride(1), weight.stride(0), weight.stride(1),
        logits_arg.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, HAS_GRAD_LOGP=grad_logp is not None,
        HAS_GRAD_ENTROPY=grad_entropy is not None, RECOMPUTE=recompute,
        DOT_PRECISION=_dot_precision(weight.dtype), DOT_UPCAST=_interpreted(), **config,
    )
    return out


TRITON_KERNELS = ChunkKernels("triton", _prepare, _stats, _dlogits)
