"""LoRA adapters through peft, and the reference policy as "the same model with adapters off".

With LoRA the reference policy of the KL term needs no second copy of the weights: the base
weights are the reference, `adapters_disabled(model)` switches the adapters off for its forward.
Fused MoE experts are 3-D parameters, not `nn.Linear`s, so they are reached with peft's
`target_parameters` (e.g. `["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from torch import nn

QWEN3_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
QWEN3_DENSE_MLP = ("gate_proj", "up_proj", "down_proj")
QWEN3_MOE_EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def _peft():
    try:
        import peft
    except ImportError as error:  # optional dependency: sapo-rl[lora]
        raise ImportError("LoRA needs peft: pip install 'sapo-rl[lora]' (or torch==2.13.0 peft)") from error
    return peft


def is_lora(model: nn.Module) -> bool:
    return callable(getattr(model, "disable_adapter", None)) and callable(
        getattr(model, "merge_and_unload", None)
    )


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    target_modules: Sequence[str] | str = QWEN3_ATTENTION,
    target_parameters: Sequence[str] | None = None,
) -> nn.Module:
    """Wrap `model` with LoRA adapters (scale alpha / rank); only the adapter weights stay trainable.

    target_modules: names of `nn.Linear` modules (suffix match), or "all-linear".
    target_parameters: names of raw parameters, for fused MoE experts (see QWEN3_MOE_EXPERTS).
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    peft = _peft()
    if isinstance(target_modules, str):
        modules = target_modules
    else:
        modules = list(target_modules)
        if any(name.split(".")[-1] in ("lm_head", "embed_tokens") for name in modules):
            raise ValueError(
                "LoRA on lm_head/embed_tokens is not supported (the hidden-state log-prob path reads the plain weight)"
            )
    _check_targets(model, modules, target_parameters)
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=modules,
        target_parameters=list(target_parameters) if target_parameters else None,
        bias="none",
    )
    return peft.get_peft_model(model, config)


def _check_targets(model: nn.Module, modules: Sequence[str] | str, parameters: Sequence[str] | None) -> None:
    """Each target name must match a module (or parameter) name's suffix, as peft matches them;
    otherwise a ValueError naming what the model does have (peft's own error is a traceback deep inside it)."""
    def matches(target: str, names: list[str]) -> bool:
        return any(n == target or n.endswith("." + target) for n in names)

    if not isinstance(modules, str):
        names = [n for n, _ in model.named_modules()]
        missing = [t for t in modules if not matches(t, names)]
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
            raise ValueError(f"lora_target_modules {missing} match no module of {type(model).__name__}; "
                             f"its linear layers are named {linear}")
    if parameters:
        names = [n for n, _ in model.named_parameters()]
        missing = [t for t in parameters if not matches(t, names)]
        if missing:
            raise ValueError(f"lora_target_parameters {missing} match no parameter of {type(model).__name__} "
                             "(e.g. mlp.experts.gate_up_proj for fused MoE experts)")


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Forward the base weights (the reference policy) inside the context; adapters come back after."""
    if not is_lora(model):
        raise TypeError(
            f"{type(model).__name__} has no LoRA adapters, so the base weights are the current weights; "
            "keep a separate reference model when training without LoRA"
        )
    with model.disable_adapter():
        yield model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights and return the plain HF model (modifies `model`)."""
    if not is_lora(model):
        raise TypeError(f"{type(model).__name__} has no LoRA adapters to merge")
    return model.merge_and_unload()
