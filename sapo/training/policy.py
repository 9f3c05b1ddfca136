"""The trainable policy: its log-prob passes and one optimizer update.

Log-probs never go through the full [N, V] logits: the backbone gives hidden states, and
`sapo.ops.token_logprobs` turns the completion positions' hidden states into log-probs chunk by
chunk (divided by the sampling temperature, as the sampler did).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sapo import distributed
from sapo.config import ConfigError, TrainConfig
from sapo.models import routing as moe
from sapo.models.forward import hidden_states, output_bias, output_weight
from sapo.objectives import aggregation_weights, policy_loss, resolve
from sapo.ops import fused_token_policy_loss, token_logprobs
from sapo.training.batch import (
    completion_positions,
    merge_metrics,
    micro_batch_plan,
    select_rows,
    split_plan,
    trim_padding,
)


@dataclass
class BehaviourPass:
    """What the behaviour policy (the weights that sampled the rollout) said about it."""

    old_logprobs: torch.Tensor | None  # [N, C] float32, None when the update is on-policy
    routing: torch.Tensor | None = None  # [L, N, P + C, k] int, MoE experts chosen by pi_old
    replay: torch.Tensor | None = None  # [L, N, P + C, k] the experts the updates force (R2: routing; R3: sampler's)
    metrics: dict[str, float] = field(default_factory=dict)


class PolicyHandle:
    def __init__(self, model, tokenizer, *, eos_token_ids: list[int], pad_token_id: int, lora: bool = False,
                 processor=None):
        self.model = model
        self.tokenizer = tokenizer
        self.processor = processor  # image processor + vision tokens of a VL model (sapo.models.vl), else None
        self.eos_token_ids = eos_token_ids
        self.pad_token_id = pad_token_id
        self.lora = lora
        self.is_moe = moe.is_moe(model)
        self.device = next(model.parameters()).device

    # -- text ---------------------------------------------------------------------------------
    def decode(self, ids: list[int]) -> str:
        ids = [i for i in ids if i not in self.eos_token_ids]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- log-probs ----------------------------------------------------------------------------
    def _autocast(self, cfg: TrainConfig):
        on = cfg.autocast_bf16 == "on" or (
            cfg.autocast_bf16 == "auto" and self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        )
        if not on:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def completion_hidden(self, model, t, cfg: TrainConfig):
        """Hidden states [n, d] that predict the n completion tokens of rows t, their labels [n], mask [b, C]."""
        input_ids = t.input_ids.to(self.device)
        extra = _stack_extra(t.extra, t.prompt_width, input_ids.shape[1], self.device)
        # with images (Qwen3-VL) the model computes its 3-D mrope positions from the ids, mask and grids
        position_ids = None if extra else t.position_ids.to(self.device)
        forward_ids = input_ids
        if extra:  # an image token the policy *sampled* is no image slot; the model would count it as one
            from sapo.models.vl import placeholder_token_ids

            forward_ids = input_ids.clone()
            completion = forward_ids[:, t.prompt_width :]  # a view: [b, C]
            completion[torch.isin(completion, placeholder_token_ids(model, self.device))] = self.pad_token_id
        with self._autocast(cfg):
            hidden = hidden_states(
                model, forward_ids, t.attention_mask.to(self.device), position_ids=position_ids, **extra,
            )  # [b, P + C, d]
        P = t.prompt_width
        mask = t.completion_mask.to(self.device)  # [b, C]
        # the hidden state at position j predicts token j + 1
        h = hidden[:, P - 1 : -1][mask]  # [n, d]
        labels = input_ids[:, P:][mask]  # [n]
        return h, labels, mask

    def completion_logprobs(self, model, t, cfg: TrainConfig, *, with_entropy: bool = False):
        """Log-probs [b, C] (float32, 0 where masked) of the completion tokens of rollout rows t."""
        h, labels, mask = self.completion_hidden(model, t, cfg)
        logp_flat, ent_flat = token_logprobs(
            h, output_weight(model), labels, temperature=cfg.temperature, with_entropy=with_entropy,
            chunk_size=cfg.logprob_chunk_size or None, bias=output_bias(model),
        )
        return _unflatten(logp_flat, mask), _unflatten(ent_flat.detach(), mask) if ent_flat is not None else None

    def _micro_batches(self, tensors, rows: torch.Tensor, cfg: TrainConfig) -> list:
        """(rows, trimmed rows, left) per forward/backward: micro_batch_plan's split of `rows`, each
        part with its all-padding columns dropped (trim_padding; `left` prompt columns)."""
        plan = micro_batch_plan(tensors, rows, max_rows=cfg.micro_batch_size, max_tokens=cfg.micro_batch_tokens)
        if cfg.micro_batch_tokens and distributed.world_size() > 1:
            try:
                plan = split_plan(plan, distributed.global_max(len(plan)))
            except ValueError as err:
                raise ConfigError(str(err)) from err
        return [(micro, *trim_padding(select_rows(tensors, micro))) for micro in plan]

    @torch.no_grad()
    def behaviour_pass(self, tensors, cfg: TrainConfig, *, need_old: bool) -> BehaviourPass:
        """Old log-probs (and the experts they used, for MoE) before any update of this step."""
        record = self.is_moe and (need_old or cfg.routing_replay != "none")
        if not (need_old or record):
            return BehaviourPass(None)
        if cfg.old_logprobs == "sampler":
            # the sampler's own log-probs (logits / temperature, before any top-k/top-p filter) stand
            # in for a second forward: equal to rounding when the engine ran this model in float32
            mask = tensors.completion_mask
            old = torch.where(mask, tensors.sampler_logprobs, 0.0).to(self.device)
            return BehaviourPass(old)
        model = self.model
        was_training = model.training
        model.eval()
        old = torch.zeros(tensors.completion_mask.shape, dtype=torch.float32, device=self.device)  # [N, C]
        routing, num_experts = None, 0
        for rows, part, left in self._micro_batches(tensors, torch.arange(tensors.num_rows), cfg):
            ctx = moe.record_routing(model) if record else contextlib.nullcontext()
            with ctx as recorder:
                logp, _ = self.completion_logprobs(model, part, cfg)  # [b, C'] (trimmed)
            old[rows.to(self.device), : logp.shape[1]] = logp
            if record:
                experts = recorder.experts  # [L, b, T', k]
                if routing is None:  # [L, N, P + C, k], positions no forward saw stay UNSET
                    routing = experts.new_full(
                        (experts.shape[0], tensors.num_rows, tensors.input_ids.shape[1], experts.shape[3]), moe.UNSET)
                routing[:, rows.to(routing.device), left : left + experts.shape[2]] = experts
                num_experts = recorder.num_experts
        model.train(was_training)
        out = BehaviourPass(old, routing, replay=routing if cfg.routing_replay == "R2" else None)
        if out.routing is not None:
            ent = moe.expert_load_entropy(out.routing, completion_positions(tensors), num_experts)
            out.metrics["moe/expert_load_entropy"] = float(sum(ent) / len(ent))
        if cfg.tis_cap > 0:
            # trainer vs sampler mismatch, before any update: log pi_old - log pi_sampler
            m = tensors.completion_mask
            diff = (out.old_logprobs - tensors.sampler_logprobs.to(out.old_logprobs.device))[m.to(self.device)]
            out.metrics["mismatch/abs_log_ratio_mean"] = diff.abs().mean().item() if diff.numel() else 0.0
        return out

    # -- reference policy ----------------------------------------------------------------------
    def reference(self):
        """A frozen reference: the base weights with adapters off (LoRA), else a frozen copy."""
        if self.lora:
            return "adapters_disabled"
        ref = copy.deepcopy(self.model).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref

    @torch.no_grad()
    def reference_logprobs(self, reference, tensors, cfg: TrainConfig) -> torch.Tensor:
        out = torch.zeros(tensors.completion_mask.shape, dtype=torch.float32, device=self.device)  # [N, C]
        for rows, part, _ in self._micro_batches(tensors, torch.arange(tensors.num_rows), cfg):
            if reference == "adapters_disabled":
                from sapo.models.lora import adapters_disabled

                with adapters_disabled(self.model):
                    logp, _ = self.completion_logprobs(self.model, part, cfg)
            else:
                logp, _ = self.completion_logprobs(reference, part, cfg)
            out[rows.to(self.device), : logp.shape[1]] = logp
        return out

    def loss_options(self, cfg: TrainConfig) -> dict:
        options = {"tau_pos": cfg.tau_pos, "tau_neg": cfg.tau_neg, "beta": cfg.beta,
                   "kl_estimator": cfg.kl_estimator}
        if cfg.epsilon_low >= 0:
            options["epsilon_low"] = cfg.epsilon_low
        if cfg.epsilon_high >= 0:
            options["epsilon_high"] = cfg.epsilon_high
        if cfg.loss_type == "dr_grpo":
            options["max_completion_length"] = cfg.max_completion_length
        return options

    # -- one optimizer update -----------------------------------------------------------------
    def fused_loss(self, cfg: TrainConfig, spec) -> bool:
        """The fused head applies to token-level objectives without KL and an lm_head without bias."""
        return (cfg.fused_loss_head and spec.token_level and spec.beta == 0
                and output_bias(self.model) is None)

    def _tis_weights(self, cfg: TrainConfig, old_logp, part, mask):
        """Truncated importance sampling: min(pi_old / pi_sampler, tis_cap) per token (sampler mismatch)."""
        if cfg.tis_cap <= 0 or old_logp is None:
            return None
        sampler = part.sampler_logprobs.to(self.device)
        weights = torch.exp((old_logp - sampler).clamp(max=20.0)).clamp(max=cfg.tis_cap)
        return torch.where(mask, weights, 0.0)

    def update(self, optimizer, tensors, rows, old: BehaviourPass, ref_logprobs, loss_options, cfg) -> dict:
        """One optimizer step on mini-batch `rows`, accumulated over micro-batches.

        Normalisers are the mini-batch's global counts (rows, unmasked tokens; summed over
        data-parallel ranks), passed to every micro-batch, so accumulation gives exactly the
        whole-mini-batch gradient. With W ranks each rank's loss is its share of that sum; the
        gradients are averaged over ranks, hence the factor W before backward (sapo/distributed.py).
        """
        model = self.model
        optimizer.zero_grad(set_to_none=True)
        mask_all = tensors.completion_mask[rows]
        num_sequences, num_tokens = distributed.global_counts(len(rows), int(mask_all.sum()))
        loss_scale = distributed.world_size()
        spec = resolve(cfg.loss_type, **loss_options)
        metrics_rows, losses, finite = [], [], True
        routing_changed: list[float] = []
        aux_coef = cfg.router_aux_loss_coef if self.is_moe else 0.0
        aux_values: list[float] = []
        for micro, part, left in self._micro_batches(tensors, rows, cfg):
            width = part.completion_mask.shape[1]  # C' <= C after trimming; columns past it are padding
            columns = slice(left, left + part.input_ids.shape[1])  # [L, b, T', k]: the trimmed part's positions
            old_routing = old.routing[:, micro.to(old.routing.device), columns] if old.routing is not None else None
            replay = old.replay[:, micro.to(old.replay.device), columns] if old.replay is not None else None
            if replay is not None:
                # R2: the experts pi_old chose; R3: those the sampler chose. The record holds the current
                # router's own top-k, so moe/routing_changed stays meaningful under replay
                ctx = moe.replay_routing(model, replay, keep_graph=aux_coef > 0)
            elif old_routing is not None or aux_coef > 0:
                ctx = moe.record_routing(model, keep_graph=aux_coef > 0)
            else:
                ctx = contextlib.nullcontext()
            with ctx as record:  # backward inside: activation checkpointing re-runs the forward
                mask = part.completion_mask.to(self.device)
                advantages = part.advantages.to(self.device)
                ref = ref_logprobs[micro.to(self.device), :width] if ref_logprobs is not None else None
                old_logp = old.old_logprobs[micro.to(self.device), :width] if old.old_logprobs is not None else None
                if old_logp is not None and self.fused_loss(cfg, spec):
                    # token-level objective: dL/dlogp is known per token, so the lm_head gradient is
                    # computed chunk by chunk inside the forward (sapo.ops.fused_token_policy_loss)
                    h, labels, _ = self.completion_hidden(model, part, cfg)
                    weights = aggregation_weights(mask, spec, num_sequences=num_sequences, num_tokens=num_tokens)
                    tis = self._tis_weights(cfg, old_logp, part, mask)
                    if tis is not None:
                        weights = weights * tis
                    loss, logp_flat, ent_flat = fused_token_policy_loss(
                        h, output_weight(model), labels,
                        old_logp[mask],
                        advantages[:, None].expand_as(mask)[mask], weights[mask], spec,
                        temperature=cfg.temperature, chunk_size=cfg.logprob_chunk_size or None, with_entropy=True,
                    )
                    logp, entropy = _unflatten(logp_flat, mask), _unflatten(ent_flat, mask)
                    with torch.no_grad():  # the diagnostics, from the same log-probs
                        _, metrics = policy_loss(
                            logp, old_logp, advantages, mask, cfg.loss_type,
                            token_weights=tis, num_sequences=num_sequences, num_tokens=num_tokens, **loss_options,
                        )
                else:
                    logp, entropy = self.completion_logprobs(model, part, cfg, with_entropy=True)
                    loss, metrics = policy_loss(
                        logp, old_logp if old_logp is not None else logp.detach(), advantages, mask, cfg.loss_type,
                        ref_logprobs=ref, token_weights=self._tis_weights(cfg, old_logp, part, mask),
                        num_sequences=num_sequences, num_tokens=num_tokens, **loss_options,
                    )
                if aux_coef > 0:
                    # load balancing over this micro-batch's real tokens, weighted by its share of the
                    # mini-batch's rows (and 1/W: the gradients are averaged over ranks, the loss scaled by W)
                    aux = moe.load_balancing_loss(record.graph_logits, record.top_k,
                                                  part.attention_mask.to(self.device).bool().flatten())
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
            if old_routing is not None:
                frac, _ = moe.routing_changed_fraction(old_routing, record.experts, completion_positions(part))
                routing_changed.append(frac)
            metrics_rows.append(metrics)
        grad_norm = float("nan")
        finite = distributed.all_true(finite)  # one rank's non-finite loss skips the update everywhere
        if finite:
            params = [p for p in model.parameters() if p.grad is not None]
            distributed.sync_gradients(params)
            grad_norm = distributed.clip_grad_norm(params, cfg.max_grad_norm)
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
        if aux_values:
            out["moe/aux_loss"] = sum(aux_values) / len(aux_values)
        return out

    # -- end of training -----------------------------------------------------------------------
    def save_final(self, path: Path, state_dict: dict | None = None) -> None:
        from sapo.models.loading import save_model

        save_model(self.model, self.tokenizer, path, state_dict=state_dict)
        if self.processor is not None:  # a VL model reloads with its image processor
            self.processor.save_pretrained(path)


def _unflatten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[n] values at the True positions of mask [b, C] -> [b, C] float32, 0 elsewhere."""
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_scatter(mask, values.float())


def _stack_extra(extra: list[dict], prompt_width: int, width: int, device) -> dict:
    if not extra:
        return {}
    from sapo.data.multimodal import collate_extra

    return {k: v.to(device) for k, v in collate_extra(extra, width, prompt_width=prompt_width).items()}


def load_policy(cfg: TrainConfig) -> PolicyHandle:
    """Model and tokenizer from cfg.model, with LoRA and gradient checkpointing as configured."""
    from sapo.models.loading import load_model

    spec = cfg.model
    if spec.startswith("builtin:"):
        from sapo.training.warmstart import BUILTIN_MODELS, WarmStartRecipe, builtin_model_path

        if spec not in BUILTIN_MODELS:
            raise ConfigError(f"model={spec!r}: unknown built-in model; choose one of {', '.join(BUILTIN_MODELS)}")
        spec = str(builtin_model_path(spec, WarmStartRecipe.from_config(cfg)))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model, tokenizer = load_model(spec, dtype=cfg.dtype, device=device)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"model={cfg.model!r}: {err}") from err
    processor = None
    from sapo.models.vl import is_vision_language, load_processor

    if is_vision_language(model):
        try:
            processor = load_processor(spec, tokenizer, model)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"model={cfg.model!r}: {err}") from err
    if cfg.routing_replay != "none" and not moe.is_moe(model):
        raise ConfigError(f"routing_replay={cfg.routing_replay} needs a Mixture-of-Experts model; "
                          f"{type(model).__name__} has no top-k router (use routing_replay=none)")
    if cfg.lora_rank:
        from sapo.models.lora import apply_lora

        try:  # [reliab] a target name the model lacks is a config error, not peft's traceback
            model = apply_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=0.0,
                               target_modules=cfg.lora_target_modules,
                               target_parameters=cfg.lora_target_parameters or None)
        except ValueError as err:
            raise ConfigError(f"model={cfg.model!r}: {err}") from None
    if cfg.freeze_router:
        routers = moe.moe_layers(model)
        if not routers:
            raise ConfigError(f"freeze_router=true needs a Mixture-of-Experts model; {type(model).__name__} has none")
        for _, router in routers:
            for p in router.parameters():
                p.requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    eos = set()
    for source in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(source, int):
            eos.add(source)
        elif isinstance(source, list | tuple):
            eos.update(int(s) for s in source)
    if not eos:
        raise ConfigError(f"model={cfg.model!r}: the tokenizer has no EOS token; completions could never end")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    return PolicyHandle(model, tokenizer, eos_token_ids=sorted(eos), pad_token_id=pad, lora=bool(cfg.lora_rank),
                        processor=processor)
