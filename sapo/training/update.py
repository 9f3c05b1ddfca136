"""One optimizer update of the policy on a mini-batch of rollout rows, accumulated over micro-batches.

Normalisers are the mini-batch's global counts (rows, unmasked tokens; summed over data-parallel
ranks), passed to every micro-batch, so accumulation gives exactly the whole-mini-batch gradient.
With W ranks each rank's loss is its share of that sum; the gradients are averaged over ranks,
hence the factor W before backward (sapo/distributed.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from sapo import distributed
from sapo.config import TrainConfig
from sapo.models import routing as moe
from sapo.models.forward import output_bias, output_weight
from sapo.objectives import aggregation_weights, objective_options, policy_loss, resolve
from sapo.objectives.presets import LossSpec
from sapo.objectives.sampler_correction import sampler_is_weights
from sapo.ops import fused_token_policy_loss
from sapo.training.batch import RolloutTensors, completion_positions, merge_metrics
from sapo.training.behaviour import BehaviourPass
from sapo.training.teacher_forcing import TeacherForcing, unflatten


@dataclass(frozen=True)
class UpdateSettings:
    """What an update needs from the config."""

    loss_type: str = "sapo"
    loss_options: dict = field(default_factory=dict)  # objective constants (tau, epsilon, beta, ...)
    max_grad_norm: float = 1.0  # 0 = no clipping
    router_aux_loss_coef: float = 0.0  # MoE load-balancing loss weight
    tis_cap: float = 0.0  # importance weights against the sampler, capped (0 = off)
    tis_mode: str = "token_truncate"  # sapo.objectives.sampler_correction.MODES
    tis_min: float = 0.0  # lower bound of the *_mask modes
    fused_head: bool = True  # the fused log-prob + loss head for token-level objectives

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> UpdateSettings:
        options = {"tau_pos": cfg.tau_pos, "tau_neg": cfg.tau_neg, "beta": cfg.beta, "kl_estimator": cfg.kl_estimator}
        if cfg.epsilon_low >= 0:
            options["epsilon_low"] = cfg.epsilon_low
        if cfg.epsilon_high >= 0:
            options["epsilon_high"] = cfg.epsilon_high
        # run values an objective declares it consumes (e.g. Dr.GRPO's max_completion_length)
        options = objective_options(cfg.loss_type, options, max_completion_length=cfg.max_completion_length)
        return cls(cfg.loss_type, options, cfg.max_grad_norm, cfg.router_aux_loss_coef, cfg.tis_cap, cfg.tis_mode,
                   cfg.tis_min, cfg.fused_loss_head)

    def spec(self) -> LossSpec:
        return resolve(self.loss_type, **self.loss_options)


def tis_weights(settings: UpdateSettings, old_logp, sampler_logp, mask):
    """Importance weights against the sampler (sapo.objectives.sampler_correction), or (None, {})."""
    if settings.tis_cap <= 0 or old_logp is None:
        return None, {}
    return sampler_is_weights(old_logp, sampler_logp, mask, mode=settings.tis_mode, cap=settings.tis_cap,
                              min_ratio=settings.tis_min)


def uses_fused_head(settings: UpdateSettings, spec: LossSpec, model) -> bool:
    """The fused head applies to objectives that declare themselves fusable (token-level, no KL) and an
    lm_head without bias."""
    return settings.fused_head and spec.fusable and output_bias(model) is None


def _routing_context(model, old: BehaviourPass, micro, columns, aux: bool):
    """Replay (R2: pi_old's experts; R3: the sampler's), or record the current choice, or nothing.
    Under replay the record holds the current router's own top-k, so moe/routing_changed stays
    meaningful."""
    old_routing = old.routing[:, micro.to(old.routing.device), columns] if old.routing is not None else None
    replay = old.replay[:, micro.to(old.replay.device), columns] if old.replay is not None else None
    if replay is not None:
        return moe.replay_routing(model, replay, keep_graph=aux), old_routing, replay
    if old_routing is not None or aux:
        return moe.record_routing(model, keep_graph=aux), old_routing, None
    return contextlib.nullcontext(), old_routing, None


def policy_update(model, optimizer, forward: TeacherForcing, tensors: RolloutTensors, rows: torch.Tensor,
                  old: BehaviourPass, ref_logprobs: torch.Tensor | None, settings: UpdateSettings, *,
                  is_moe: bool) -> dict:
    """One optimizer step on mini-batch `rows`; returns its metrics, or {"nonfinite": 1.0} when the loss
    or the gradient was not finite (the weights are then left untouched)."""
    optimizer.zero_grad(set_to_none=True)
    device = forward.device
    mask_all = tensors.completion_mask[rows]
    num_sequences, num_tokens = distributed.global_counts(len(rows), int(mask_all.sum()))
    loss_scale = distributed.world_size()
    spec = settings.spec()
    fused = uses_fused_head(settings, spec, model)
    aux_coef = settings.router_aux_loss_coef if is_moe else 0.0
    metrics_rows, losses, finite = [], [], True
    routing_changed: list[float] = []
    replay_mismatch: list[float] = []  # share of replayed tokens whose experts were not the forced ones
    aux_values: list[float] = []
    for micro, part, left in forward.micro_batches(tensors, rows):
        width = part.completion_mask.shape[1]  # C' <= C after trimming; columns past it are padding
        columns = slice(left, left + part.input_ids.shape[1])  # [L, b, T', k]: the trimmed part's positions
        ctx, old_routing, replay = _routing_context(model, old, micro, columns, aux_coef > 0)
        with ctx as record:  # backward inside: activation checkpointing re-runs the forward
            mask = part.completion_mask.to(device)
            advantages = part.advantages.to(device)
            ref = ref_logprobs[micro.to(device), :width] if ref_logprobs is not None else None
            old_logp = old.old_logprobs[micro.to(device), :width] if old.old_logprobs is not None else None
            tis, tis_metrics = tis_weights(settings, old_logp, part.sampler_logprobs.to(device), mask)
            counts = {"num_sequences": num_sequences, "num_tokens": num_tokens}
            if old_logp is not None and fused:
                # token-level objective: dL/dlogp is known per token, so the lm_head gradient is
                # computed chunk by chunk inside the forward (sapo.ops.fused_token_policy_loss)
                h, labels, _ = forward.hidden(model, part)
                weights = aggregation_weights(mask, spec, **counts)
                if tis is not None:
                    weights = weights * tis
                loss, logp_flat, ent_flat = fused_token_policy_loss(
                    h, output_weight(model), labels, old_logp[mask], advantages[:, None].expand_as(mask)[mask],
                    weights[mask], spec, temperature=forward.settings.temperature,
                    chunk_size=forward.settings.chunk_size or None, with_entropy=True,
                )
                logp, entropy = unflatten(logp_flat, mask), unflatten(ent_flat, mask)
                with torch.no_grad():  # the diagnostics, from the same log-probs
                    _, metrics = policy_loss(logp, old_logp, advantages, mask, settings.loss_type, token_weights=tis,
                                             **counts, **settings.loss_options)
            else:
                logp, entropy = forward.logprobs(model, part, with_entropy=True)
                loss, metrics = policy_loss(
                    logp, old_logp if old_logp is not None else logp.detach(), advantages, mask, settings.loss_type,
                    ref_logprobs=ref, token_weights=tis, **counts, **settings.loss_options,
                )
            if aux_coef > 0:
                # load balancing over this micro-batch's real tokens, weighted by its share of the
                # mini-batch's rows (and 1/W: the gradients are averaged over ranks, the loss scaled by W)
                aux = moe.load_balancing_loss(record.graph_logits, record.top_k,
                                              part.attention_mask.to(device).bool().flatten())
                aux_values.append(aux.item())
                loss = loss + aux_coef * aux * len(micro) / len(rows) / loss_scale
            if not torch.isfinite(loss):
                finite = False
                if loss_scale == 1:  # several ranks: keep the backward collectives in step
                    break
            (loss * loss_scale).backward()
        losses.append(loss.detach())
        if entropy is not None and mask.any():
            metrics["entropy/mean"] = entropy[mask].mean().item()
        metrics.update(tis_metrics)
        if old_routing is not None:
            frac, _ = moe.routing_changed_fraction(old_routing, record.experts, completion_positions(part))
            routing_changed.append(frac)
        if replay is not None:  # did the forward use the forced experts? (0 when replay works)
            replay_mismatch.append(moe.replay_mismatch_fraction(replay, record.used_experts, completion_positions(part)))
        metrics_rows.append(metrics)
    grad_norm = float("nan")
    finite = distributed.all_true(finite)  # one rank's non-finite loss skips the update everywhere
    if finite:
        params = [p for p in model.parameters() if p.grad is not None]
        distributed.sync_gradients(params)
        grad_norm = distributed.clip_grad_norm(params, settings.max_grad_norm)
        finite = bool(torch.isfinite(torch.tensor(grad_norm)))
    if not finite:
        # never step on a poisoned gradient: the weights stay as they were
        optimizer.zero_grad(set_to_none=True)
        return {"nonfinite": 1.0}
    optimizer.step()
    # each micro-batch's loss/* is its share of the mini-batch loss (global normalisers): sum them
    out = merge_metrics(metrics_rows, sum_prefixes=("loss/",))
    out["loss/total"] = float(sum(losses).item())
    out["grad_norm"] = grad_norm
    if routing_changed:
        out["moe/routing_changed"] = sum(routing_changed) / len(routing_changed)
    if replay_mismatch:
        out["moe/replay_mismatch"] = sum(replay_mismatch) / len(replay_mismatch)
    if aux_values:
        out["moe/aux_loss"] = sum(aux_values) / len(aux_values)
    return out
