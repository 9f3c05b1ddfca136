"""Masking without leaks: padding may hold NaN/inf, and none of it may reach the loss or the gradients.

torch.where(mask, x, 0) is the obvious select, but on CPU it runs ~30x slower than a product
(0.6 ms vs 0.02 ms for 256k floats, torch 2.13), and so do the bool-mask kernels autograd uses for
clamp and nan_to_num; together they tripled the cost of the loss. `masked_finite` does the same job
with float kernels only: it first makes every value finite (torch.nan_to_num), then multiplies by
the 0/1 float mask - a product with 0 is exact on finite values - and its backward is one product
with a precomputed 0/1 weight. Never multiply a possibly non-finite tensor by the mask directly
(NaN * 0 = NaN).

A NaN at an unmasked slot is a real error, not padding: it is flagged, and policy_loss turns the
flag into a NaN loss instead of silently training on a zero.
"""

from __future__ import annotations

import math

import torch

# An unmasked NaN is written as this value (finite, beyond any real log-prob) so one amax finds it.
_NAN_MARK = torch.finfo(torch.float32).max
NO_BOUND = 1e30  # bound for values that are not clamped


def float_mask(mask: torch.Tensor) -> torch.Tensor:
    """[B, T] float32 0/1 mask. A float32 mask is taken as it is (it must hold 0/1); a bool mask is
    converted; any other dtype counts nonzero entries as completion tokens."""
    if mask.dtype == torch.float32:
        return mask
    return mask.float() if mask.dtype == torch.bool else (mask != 0).float()


def _infinity(bound: float) -> float:
    """What +inf becomes before clamping: beyond a real bound (so the clamp gives it no gradient)."""
    return 2.0 * bound if bound < NO_BOUND else bound


def _mask_in_place(values: torch.Tensor, mask: torch.Tensor, bound: float, flag_nan: bool) -> torch.Tensor:
    """Makes `values` finite, zero where masked and clamped, in place; returns the [] bool NaN flag."""
    big = _infinity(bound)
    torch.nan_to_num_(values, nan=_NAN_MARK if flag_nan else 0.0, posinf=big, neginf=-big)
    has_nan = _zero_and_flag(values, mask, flag_nan)
    if bound < NO_BOUND:
        values.clamp_(-bound, bound)
    return has_nan


def _zero_and_flag(finite: torch.Tensor, mask: torch.Tensor, flag_nan: bool) -> torch.Tensor:
    finite.mul_(mask)  # exactly 0 where masked: every value is finite now
    if flag_nan and finite.numel():
        return finite.amax() == _NAN_MARK  # an unmasked NaN (+-inf became at most 2 * bound, below the mark)
    return torch.zeros((), dtype=torch.bool, device=finite.device)


class _MaskedFinite(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, mask, bound, flag_nan):
        big = _infinity(bound)
        result = torch.nan_to_num(values, nan=_NAN_MARK if flag_nan else 0.0, posinf=big, neginf=-big)
        has_nan = _zero_and_flag(result, mask, flag_nan)
        if ctx.needs_input_grad[0]:
            # d result / d values, as torch.clamp: 1 where |x| <= bound at unmasked slots, else 0
            # (sign(bound - |x|) is 1, 0, -1 inside, on, beyond the bound; + 1, capped at 1).
            if bound < NO_BOUND:
                weight = result.abs().neg_().add_(bound).sign_().add_(1.0).clamp_(max=1.0).mul_(mask)
            else:
                weight = mask
            ctx.save_for_backward(weight)
        if bound < NO_BOUND:
            result.clamp_(-bound, bound)
        ctx.mark_non_differentiable(has_nan)
        return result, has_nan

    @staticmethod
    def backward(ctx, grad, _):
        (weight,) = ctx.saved_tensors
        return grad * weight, None, None, None


def masked_finite(
    values: torch.Tensor, mask: torch.Tensor, bound: float = NO_BOUND, *, flag_nan: bool = True,
    owned: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values at unmasked slots, clamped to [-bound, bound], exactly 0 at masked slots, float32;
    a [] bool that is True when an unmasked slot held NaN, always False with flag_nan=False).

    `mask` is the float 0/1 mask. +-inf map to +-bound. The gradient is torch.clamp's at unmasked slots
    (1 for |x| <= bound, 0 beyond, 0 for +-inf) and 0 at masked slots. owned=True: `values` is a float32 temporary of the caller's, which may be reused
    in place when no gradient is needed (saves an allocation).
    """
    values = values.float()
    if owned and not values.requires_grad:
        return values, _mask_in_place(values, mask, float(bound), flag_nan)
    return _MaskedFinite.apply(values, mask, float(bound), flag_nan)


def nan_if(flag: torch.Tensor) -> torch.Tensor:
    """Scalar float32: nan where `flag` (a [] bool) is True, else 0.0 - added to a loss, it poisons it."""
    return torch.where(flag, math.nan, 0.0)
