"""Policy loss of a token-level objective fused with the lm_head: gradients computed in the forward pass.

For a token-level objective (SAPO, GRPO, DAPO, Dr.GRPO, CISPO) the loss is
    L = sum_n w_n * l(logp_n)       (w: token_weights, the aggregation weights flattened to [N])
and dL/dlogp_n depends on token n alone. So each chunk's gradient can be finished as soon as its
logits exist: z -> logp -> g = dL/dlogp (autograd on the [n] vector) -> dL/dlogits = g (onehot - p) / T
-> dL/dhidden = dlogits @ W and dL/dW += dlogits^T @ hidden. The backward only scales the stored
gradients by dL/dloss. Three lm_head-sized matmuls instead of four (forward, recomputed forward, two
gradient matmuls), and never more than one chunk of logits.
"""

from __future__ import annotations

import torch

from sapo.objectives import LossSpec, resolve, token_loss
from sapo.ops.logprobs import (
    ChunkKernels,
    accumulate_grads,
    check_inputs,
    grad_buffers,
    no_autocast,
    resolve_chunk_size,
    select_kernels,
)


def _chunk_loss_grad(logp_c, old_c, adv_c, weights_c, spec):
    """(sum_n w_n l_n, dL/dlogp [n]) for one chunk; positions with w = 0 contribute nothing (not even NaN)."""
    keep = weights_c != 0  # [n]
    logp_leaf = logp_c.detach().requires_grad_(True)  # [n]
    old = torch.where(keep, old_c.float(), logp_c)  # masked slots: ratio 1, finite
    adv = torch.where(keep, adv_c.float(), 0.0)
    with torch.enable_grad():
        # token_loss takes [B, T] (or a [B] advantage); view the chunk as one row [1, n].
        per_token = token_loss(logp_leaf[None], old[None], adv[None], spec)[0]  # [n]
        loss_c = torch.where(keep, per_token * weights_c, 0.0).sum()
        (grad_logp,) = torch.autograd.grad(loss_c, logp_leaf)
    return loss_c.detach(), grad_logp  # scalar, [n]


class _FusedTokenPolicyLoss(torch.autograd.Function):
    @staticmethod
    @no_autocast
    def forward(
        ctx, hidden, weight, labels, old_logprobs, advantages, token_weights, spec, temperature, chunk_size,
        with_entropy, kernels: ChunkKernels,
    ):
        n = hidden.shape[0]
        need_h, need_w = ctx.needs_input_grad[:2]
        weight_k, _ = kernels.prepare(weight, None)
        inv_temperature = 1.0 / temperature
        logp = hidden.new_empty(n, dtype=torch.float32)  # [N]
        entropy = hidden.new_empty(n, dtype=torch.float32) if with_entropy else None  # [N]
        grad_hidden, grad_weight, _ = grad_buffers(hidden, weight, need_h, need_w, False)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_size):
            rows = slice(start, min(start + chunk_size, n))
            # matmul 1 of 3; what the gradient below needs of this chunk's logits is kept
            logp_c, lse_c, ent_c, kept = kernels.stats(
                hidden[rows], weight_k, None, labels[rows], inv_temperature, with_entropy, True
            )
            logp[rows] = logp_c
            if with_entropy:
                entropy[rows] = ent_c
            loss_c, grad_logp = _chunk_loss_grad(
                logp_c, old_logprobs[rows], advantages[rows], token_weights[rows], spec
            )
            loss += loss_c
            if need_h or need_w:
                dlogits = kernels.dlogits(
                    hidden[rows], weight_k, None, labels[rows], lse_c, grad_logp, None, None, inv_temperature, kept
                )
                accumulate_grads(dlogits, hidden, rows, weight_k, grad_hidden, grad_weight, None)  # matmuls 2, 3
                del dlogits
            del kept
        ctx.save_for_backward(grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype))
        ctx.mark_non_differentiable(logp)
        if with_entropy:
            ctx.mark_non_differentiable(entropy)
        return loss, logp, entropy

    @staticmethod
    def backward(ctx, grad_loss, grad_logp, grad_entropy):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight * grad_loss.to(grad_weight.dtype)
        return (grad_hidden, grad_weight) + (None,) * 9


def fused_token_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    token_weights: torch.Tensor,
    spec: LossSpec | str,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    with_entropy: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Loss sum_n token_weights[n] * token_loss_n of a token-level objective, straight from hidden states.

    hidden [N, d], weight [V, d], labels [N] long; old_logprobs, advantages and token_weights [N] (flattened
    completion tokens; token_weights = aggregation_weights(mask, spec, ...) flattened, times any detached
    per-token multiplier, 0 at masked slots). `spec` is a LossSpec (or a loss_type name) with
    ratio_level='token' and beta = 0; the KL term needs ref log-probs: use token_logprobs + policy_loss.
    Returns (loss scalar float32, logprobs [N] float32 detached, entropy [N] float32 detached or None).
    The loss is differentiable in hidden and weight only; their gradients are computed during this call,
    chunk by chunk, and held until backward (memory: one [N, d] and one [V, d] float32 buffer).
    No lm_head bias (the models we train have none).
    """
    check_inputs(hidden, weight, labels, None)
    if isinstance(spec, str):
        spec = resolve(spec)
    if not spec.token_level:
        raise ValueError(
            f"fused_token_policy_loss needs a token-level objective (ratio_level='token', e.g. sapo, grpo, dapo, "
            f"dr_grpo, cispo); {spec.loss_type!r} has ratio_level={spec.ratio_level!r}: use token_logprobs + "
            "policy_loss"
        )
    if spec.beta != 0:
        raise ValueError(
            f"fused_token_policy_loss has no KL term (beta={spec.beta}): use token_logprobs + policy_loss "
            "with ref_logprobs"
        )
    for name, tensor in (("old_logprobs", old_logprobs), ("advantages", advantages), ("token_weights", token_weights)):
        if tensor.shape != labels.shape:
            raise ValueError(f"{name} must be flat [N] = [{labels.shape[0]}] like labels, got {tuple(tensor.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not torch.is_grad_enabled():  # evaluation: no gradient matmuls (needs_input_grad ignores no_grad)
        hidden, weight = hidden.detach(), weight.detach()
    kernels = select_kernels(hidden.device, backend)
    chunk = resolve_chunk_size(chunk_size, hidden.shape[0], weight.shape[0], hidden.device)
    return _FusedTokenPolicyLoss.apply(
        hidden,
        weight,
        labels,
        old_logprobs.detach(),
        advantages.detach(),
        token_weights.detach().float(),
        spec,
        float(temperature),
        chunk,
        bool(with_entropy),
        kernels,
    )
