"""Our objectives in verl's policy-loss registry (written against verl 0.9.1, `verl/trainer/ppo/core_algos.py`).

A verl user switches objective by config:

    actor_rollout_ref.model.external_lib=sapo.integrations.verl        # imported in every worker: registers
    actor_rollout_ref.actor.policy_loss.loss_mode=sapo_gated            # or sapo_grpo, sapo_dapo, sapo_gspo, ...
    actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean           # SAPO's aggregation (verl's default is token-mean)

Importing this module registers the names of VERL_NAMES when verl is importable (and does nothing otherwise).
Each registered function has verl's policy-loss signature and returns (pg_loss, metrics) with verl's three
metrics (actor/pg_clipfrac, actor/ppo_kl, actor/pg_clipfrac_lower) plus all of ours under `actor/`.

What comes from verl's ActorConfig:
  tau_pos, tau_neg                      -> SAPO's gate temperatures
  clip_ratio_low/high (else clip_ratio) -> epsilon_low/high of the clipping objectives; for CISPO the cap
                                           1 + clip_ratio_high (our CISPO has no lower clip, verl's has)
  loss_agg_mode                         -> aggregation: token-mean, seq-mean-token-mean, seq-mean-token-sum-norm
                                           (GSPO's sequence ratio takes seq-mean-token-mean only)
  loss_scale_factor (else the padded response width) -> max_completion_length of seq-mean-token-sum-norm
  global_batch_info (dp_size, batch_num_tokens, global_batch_size) -> our num_tokens / num_sequences:
      verl scales each rank's loss by dp_size / global count and averages gradients over ranks, which is our
      loss with num_tokens = batch_num_tokens / dp_size and num_sequences = global_batch_size / dp_size.
      Without them (single process) verl normalises by this micro-batch's tokens, or by its non-empty rows.
Other options of `policy_loss` are fixed per registered name: `register_objective(name, loss_type, **options)`.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from typing import Any

import torch

from sapo.objectives import policy_loss, resolve
from sapo.objectives.presets import PRESETS

# verl's loss_agg_mode -> our aggregation; verl's token-sum and seq-mean-token-sum have no counterpart here.
AGGREGATIONS = {
    "token-mean": "token_mean",
    "seq-mean-token-mean": "seq_mean_token_mean",
    "seq-mean-token-sum-norm": "seq_mean_token_sum_norm",
}
# verl loss_mode -> our loss_type. verl has its own "sapo", "gspo" and "cispo": ours carry a sapo_ prefix.
VERL_NAMES = {"sapo_gated": "sapo", **{f"sapo_{name}": name for name in PRESETS if name != "sapo"}}

PolicyLossFn = Callable[..., tuple[torch.Tensor, dict[str, Any]]]


def _config_value(config, name: str):
    return None if config is None else getattr(config, name, None)


def config_options(config, loss_type: str, loss_agg_mode: str, response_mask: torch.Tensor) -> dict[str, Any]:
    """policy_loss options read from verl's actor config (see the module docstring)."""
    if loss_agg_mode not in AGGREGATIONS:
        raise ValueError(f"loss_agg_mode={loss_agg_mode!r} is not supported by sapo objectives; "
                         f"allowed: {', '.join(AGGREGATIONS)}")
    spec = resolve(loss_type, max_completion_length=1)
    aggregation = AGGREGATIONS[loss_agg_mode]
    if spec.ratio_level == "sequence":  # one loss per sequence: only a mean over sequences is meaningful
        if loss_agg_mode != "seq-mean-token-mean":
            raise ValueError(f"{loss_type!r} has one loss per sequence: set loss_agg_mode=seq-mean-token-mean "
                             f"(got {loss_agg_mode!r}), or use loss_mode=sapo_gspo_token")
        aggregation = "seq_mean"
    clip_ratio = _config_value(config, "clip_ratio")
    low, high = _config_value(config, "clip_ratio_low"), _config_value(config, "clip_ratio_high")
    options = {
        "aggregation": aggregation,
        "tau_pos": _config_value(config, "tau_pos"),
        "tau_neg": _config_value(config, "tau_neg"),
        "epsilon_low": clip_ratio if low is None else low,
        "epsilon_high": clip_ratio if high is None else high,
    }
    if spec.shaping == "cispo":
        options.update(epsilon_low=None, cispo_cap_mode="relative")
    if aggregation == "seq_mean_token_sum_norm":
        info = _config_value(config, "global_batch_info") or {}
        scale = info.get("loss_scale_factor") or _config_value(config, "loss_scale_factor")
        options["max_completion_length"] = int(scale or response_mask.shape[-1])
    return options


def normalisers(config, response_mask: torch.Tensor) -> dict[str, Any]:
    """num_tokens / num_sequences of this micro-batch that give verl's agg_loss normalisation."""
    info = _config_value(config, "global_batch_info") or {}
    dp_size = info.get("dp_size") or 1
    tokens, rows = info.get("batch_num_tokens"), info.get("global_batch_size")
    if dp_size > 1 and (tokens is None or rows is None):
        raise ValueError(f"dp_size={dp_size} needs global_batch_info['batch_num_tokens'] and ['global_batch_size'] "
                         "(verl's engines set them): without them the ranks' losses would not add up")
    nonempty = (response_mask.sum(-1) > 0).sum()  # verl's default: sequences with at least one token
    return {
        "num_tokens": None if tokens is None else tokens / dp_size,
        "num_sequences": nonempty if rows is None else rows / dp_size,
    }


def verl_policy_loss(
    loss_type: str,
    old_log_prob: torch.Tensor,  # [B, T]
    log_prob: torch.Tensor,  # [B, T], gradient flows
    advantages: torch.Tensor,  # [B, T] (verl broadcasts outcome advantages over tokens)
    response_mask: torch.Tensor,  # [B, T]
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: torch.Tensor | None = None,  # [B, T] detached rollout-correction weights
    **options,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """policy_loss of `loss_type` with verl's arguments; `options` override those read from `config`."""
    mask = response_mask.bool()
    options = {**config_options(config, loss_type, loss_agg_mode, mask), **options}
    if options["aggregation"] == "seq_mean" and advantages.dim() == 2:  # GSPO: one advantage per sequence
        advantages = (advantages * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # [B], the row's (constant) value
    loss, metrics = policy_loss(
        log_prob, old_log_prob, advantages, mask, loss_type, token_weights=rollout_is_weights,
        **normalisers(config, mask), **options,
    )
    with torch.no_grad():  # verl's ppo_kl: mean of log(pi_old / pi) over response tokens
        log_ratio = (old_log_prob.float() - log_prob.float()).clamp(-20.0, 20.0)
        ppo_kl = (torch.where(mask, log_ratio, 0.0).sum() / mask.sum().clamp(min=1)).item()
    clip_fraction = next((metrics[key] for key in ("clip/frac", "clip/seq_frac", "cispo/capped_frac")
                          if key in metrics), 0.0)
    pg_metrics = {"actor/pg_clipfrac": clip_fraction, "actor/ppo_kl": ppo_kl, "actor/pg_clipfrac_lower": 0.0}
    pg_metrics.update({f"actor/{name}": value for name, value in metrics.items()})
    return loss, pg_metrics


def make_policy_loss(loss_type: str = "sapo", **options) -> PolicyLossFn:
    """A function with verl's policy-loss signature computing our `loss_type`; `options` are fixed overrides."""
    resolve(loss_type, **{"max_completion_length": 1, **options})  # fail now on a bad name or option

    def compute_policy_loss(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "token-mean",
        config=None,
        rollout_is_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        return verl_policy_loss(loss_type, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode,
                                config, rollout_is_weights, **options)

    compute_policy_loss.__name__ = compute_policy_loss.__qualname__ = f"compute_policy_loss_sapo_{loss_type}"
    return compute_policy_loss


compute_policy_loss_sapo_gated = make_policy_loss("sapo")


def _verl_register():
    from verl.trainer.ppo.core_algos import register_policy_loss

    return register_policy_loss


def register_objective(name: str, loss_type: str, register_policy_loss=None, **options) -> PolicyLossFn:
    """Register our `loss_type` (with fixed `options`) under verl loss_mode `name`.

    register_policy_loss: verl's decorator factory `register_policy_loss(name)(fn)`; default: verl's own.
    """
    register_policy_loss = register_policy_loss or _verl_register()
    return register_policy_loss(name)(make_policy_loss(loss_type, **options))


def register(register_policy_loss=None) -> list[str]:
    """Register every name of VERL_NAMES in verl's policy-loss registry; returns the names."""
    register_policy_loss = register_policy_loss or _verl_register()
    for name, loss_type in VERL_NAMES.items():
        register_objective(name, loss_type, register_policy_loss)
    return list(VERL_NAMES)


if "verl" in sys.modules or importlib.util.find_spec("verl") is not None:  # verl imports us mid-import too
    register()
