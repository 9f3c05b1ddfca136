"""Routing record / replay for top-k MoE routers, and routing diagnostics.

Why: in an MoE policy the experts a token is sent to can change between the forward that produced
the old log-probs and the forward being optimised, so the importance ratio mixes a weight change
with a discrete routing change. Routing replay removes the second part:

- R2: record the experts chosen by the old policy's training forward (`record_routing`) and force
  them in the new forwards (`replay_routing`).
- R3: record the experts chosen during generation (prefill + decode steps) and force those.

Under replay the gate *weights* are still the current router's, computed as the family's own router
computes them for the forced experts (softmax renormalised or not, DeepSeek-V3's sigmoid with its
scaling factor, gpt-oss's softmax over the k logits: `sapo.models.moe_families`), so the router keeps
receiving gradients and an unchanged model reproduces its forward exactly. Only the discrete top-k
choice is pinned.

Every record also holds the experts the experts module was *actually called with* (`used_experts`),
so `replay_mismatch_fraction` can prove that a replay took effect.

Supported routers: the families registered in `sapo.models.moe_families` (Qwen3-MoE, Qwen3-VL-MoE,
Qwen3.5-MoE, Qwen3-Next, Qwen2-MoE, OLMoE, Mixtral, DeepSeek-V3, GLM-4-MoE, gpt-oss, ...). A model with a
router of another kind is still an MoE model (`is_moe`), but recording or replaying its routing raises
NotImplementedError naming the family, instead of silently doing nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sapo.models.moe_families import FAMILIES, config_declares_experts, family_of, is_router_like

UNSET = -1  # a routing entry of -1 means "no recorded choice: let the current router pick"
SUPPORTED_ROUTERS = tuple(router for family in FAMILIES for router in family.routers)


def moe_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """`(qualified name, router module)` of every MoE layer, in layer order; routers of kinds
    `sapo.models.moe_families` does not know are listed too (`routing_unavailable` says so)."""
    return [(name, module) for name, module in model.named_modules() if is_router_like(name, module)]


def is_moe(model: nn.Module) -> bool:
    """The model has MoE layers (a router module, or a config that declares experts), whether or not
    sapo can record or replay its routing."""
    return bool(moe_layers(model)) or config_declares_experts(model)


def _family_name(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or type(model).__name__


def routing_unavailable(model: nn.Module, *, replay: bool = False) -> str | None:
    """Why this model's routing cannot be recorded (or, with `replay`, forced); None when it can."""
    layers = moe_layers(model)
    if not layers:
        if config_declares_experts(model):
            return (f"{_family_name(model)} ({type(model).__name__}) declares experts in its config but has no router "
                    "module sapo recognises (a transformers MoE layout sapo.models.moe_families does not know)")
        return f"{type(model).__name__} has no MoE layers"
    for name, router in layers:
        family = family_of(router)
        if family is None:
            return (f"router {name} of {_family_name(model)} is a {type(router).__name__}, a router kind "
                    f"sapo.models.moe_families does not know (known: {', '.join(f.name for f in FAMILIES)}); "
                    "docs/models.md says how to add one")
        if replay and family.no_replay:
            return f"the {family.name} router {name} cannot be forced: {family.no_replay}"
    return None


def require_routing(model: nn.Module, feature: str, *, replay: bool = False) -> None:
    """Raise NotImplementedError naming `feature` and the model family when its routing cannot be
    recorded (or replayed); a dense model raises ValueError."""
    reason = routing_unavailable(model, replay=replay)
    if reason is None:
        return
    if not is_moe(model):
        raise ValueError(f"{feature} needs a Mixture-of-Experts model: {reason}")
    raise NotImplementedError(f"{feature} is not available for this model: {reason}")


def routing_dtype(num_experts: int) -> torch.dtype:
    """int8 when every expert id (and the -1 marker) fits, else int16."""
    if num_experts > torch.iinfo(torch.int16).max:
        raise ValueError(f"num_experts={num_experts} does not fit int16 routing storage")
    return torch.int8 if num_experts <= torch.iinfo(torch.int8).max else torch.int16


@dataclass
class RoutingRecord:
    """Routing seen during the forwards of one context, per MoE layer and per forward call.

    Several calls (prefill, then one call per decode step) are joined along the sequence axis, so
    one forward of `[B, T]` or one generation gives `experts` of shape `[L, B, T_total, k]`.
    A generation engine whose finished rows leave the batch calls `select_rows(rows)` before the
    forwards that cover only `rows` of the original batch; positions a row did not reach hold -1.
    """

    num_experts: int
    top_k: int
    experts_calls: list[list[torch.Tensor]] = field(default_factory=list)  # [L][call] -> [b, t, k]
    logits_calls: list[list[torch.Tensor]] = field(default_factory=list)  # [L][call] -> [b, t, E] fp32
    used_calls: list[list[torch.Tensor]] = field(default_factory=list)  # [L][call] -> [b, t, k] fed to experts
    rows_calls: list[torch.Tensor | None] = field(default_factory=list)  # [call] -> [b] original rows
    current_rows: torch.Tensor | None = None
    # with keep_graph: each layer's router logits [b * t, E] of the latest forward, with their autograd
    # graph (for a load-balancing loss); overwritten by the next forward
    graph_logits: list[torch.Tensor | None] = field(default_factory=list)

    def select_rows(self, rows: torch.Tensor) -> None:
        """The next forwards run on these rows (indices into the first call's batch)."""
        self.current_rows = rows.detach().to("cpu", torch.long)

    def _join(self, calls: list[list[torch.Tensor]], fill: float, what: str) -> torch.Tensor:
        if not calls or not calls[0]:
            raise ValueError(f"no {what} recorded: run a forward of the model inside the context")
        rows_calls = self.rows_calls[: len(calls[0])]
        if all(rows is None for rows in rows_calls):
            sizes = {c.shape[0] for layer in calls for c in layer}
            if len(sizes) != 1:
                raise ValueError(
                    f"forward calls in one record had different batch sizes {sorted(sizes)}; record each "
                    "forward in its own context, or call record.select_rows(rows) when rows leave the batch"
                )
            return torch.stack([torch.cat(layer, dim=1) for layer in calls])  # [L, B, T, *]
        first = calls[0][0]
        batch, length = first.shape[0], sum(c.shape[1] for c in calls[0])
        joined = first.new_full((len(calls), batch, length, first.shape[2]), fill)  # [L, B, T, *]
        for layer, layer_calls in enumerate(calls):
            start = 0
            for call, rows in zip(layer_calls, rows_calls):
                rows = torch.arange(batch) if rows is None else rows
                joined[layer, rows.to(joined.device), start : start + call.shape[1]] = call
                start += call.shape[1]
        return joined

    @property
    def experts(self) -> torch.Tensor:
        """Selected experts `[L, B, T, k]` (int8 or int16), in the router's top-k order."""
        return self._join(self.experts_calls, UNSET, "routing")

    @property
    def used_experts(self) -> torch.Tensor:
        """The experts `[L, B, T, k]` each MoE layer's experts module was called with: under replay the
        forced ones where replay took effect; without replay, the router's own choice."""
        return self._join(self.used_calls, UNSET, "used experts")

    @property
    def router_logits(self) -> torch.Tensor:
        """Router logits `[L, B, T, E]` float32 (only with `with_logits=True`; NaN where unreached)."""
        return self._join(self.logits_calls, float("nan"), "router logits (pass with_logits=True)")


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1  # an activation-checkpoint recompute


@contextlib.contextmanager
def _routing_hooks(
    model: nn.Module, replay: torch.Tensor | None, with_logits: bool, keep_graph: bool = False
) -> Iterator[RoutingRecord]:
    feature = "routing replay" if replay is not None else "routing record"
    require_routing(model, feature, replay=replay is not None)
    layers = moe_layers(model)
    families = [family_of(router) for _, router in layers]
    first = layers[0][1]
    record = RoutingRecord(num_experts=first.num_experts, top_k=first.top_k)
    record.experts_calls = [[] for _ in layers]
    record.used_calls = [[] for _ in layers]
    record.logits_calls = [[] for _ in layers]
    record.graph_logits = [None for _ in layers]
    store = routing_dtype(record.num_experts)
    if replay is not None and (
        replay.dim() != 4 or replay.shape[0] != len(layers) or replay.shape[3] != first.top_k
    ):
        raise ValueError(
            f"replayed routing has shape {tuple(replay.shape)}; expected [L={len(layers)}, B, T, k={first.top_k}]"
        )
    shapes: list[tuple[int, int]] = [(0, 0)] * len(layers)  # (B, T) of the current call, per layer
    handles = []

    def block_pre_hook(index: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs.get("hidden_states")
            if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
                raise NotImplementedError(f"MoE block {layers[index][0]} did not get a [B, T, d] input")
            shapes[index] = (hidden.shape[0], hidden.shape[1])

        return hook

    def router_hook(index: int):
        rule = families[index].rule

        def hook(router, args, output):
            batch, length = shapes[index]
            if not (isinstance(output, tuple) and len(output) == 3 and output[2].dim() == 2):
                raise NotImplementedError(
                    f"{families[index].name} router {layers[index][0]} returned an unknown layout; expected "
                    "(router_logits, top-k weights [N, k], top-k indices [N, k])"
                )
            chosen = output[2]  # [N, k] the current router's own top-k
            if chosen.shape != (batch * length, router.top_k):
                raise NotImplementedError(
                    f"router {layers[index][0]} saw {chosen.shape[0]} tokens, block {batch}x{length}"
                )
            in_backward = _in_backward()
            logits = None
            if not in_backward:
                if index == 0:
                    record.rows_calls.append(record.current_rows)
                record.experts_calls[index].append(chosen.detach().reshape(batch, length, -1).to(store))
            if with_logits or replay is not None or keep_graph:
                logits = rule.logits(router, args[0])  # [N, E], as the router computes them
            if keep_graph and not in_backward:
                record.graph_logits[index] = logits
            if with_logits and not in_backward:
                record.logits_calls[index].append(logits.detach().float().reshape(batch, length, -1))
            if replay is None:
                return None
            forced = replay[index]
            if forced.shape[:2] != (batch, length):
                raise ValueError(
                    f"replayed routing is for a [B={forced.shape[0]}, T={forced.shape[1]}] batch but the "
                    f"forward got [B={batch}, T={length}]: slice its rows to the micro-batch (routing[:, rows])"
                )
            forced = forced.to(device=chosen.device, dtype=torch.long).reshape(batch * length, -1)  # [N, k]
            unset = (forced < 0).any(dim=-1, keepdim=True)  # [N, 1] positions with no recorded choice
            forced = torch.where(unset, chosen, forced)
            return (output[0], rule.weights(router, logits, forced), forced)

        return hook

    def experts_pre_hook(index: int):
        # what the experts module is actually called with: (hidden [N, d], top-k indices [N, k], weights)
        def hook(module, args, kwargs):
            if _in_backward():
                return
            batch, length = shapes[index]
            indices = args[1] if len(args) > 1 else next(
                (kwargs[key] for key in ("top_k_index", "router_indices", "selected_experts") if key in kwargs), None)
            if not isinstance(indices, torch.Tensor) or indices.shape[0] != batch * length:
                raise NotImplementedError(
                    f"the {families[index].name} experts of {layers[index][0]} were not called with top-k "
                    f"indices [N={batch * length}, k]: sapo.models.moe_families' layout for it is out of date"
                )
            record.used_calls[index].append(indices.detach().reshape(batch, length, -1).to(store))

        return hook

    try:
        for index, (name, router) in enumerate(layers):
            block = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            experts = getattr(block, families[index].experts, None)
            if not isinstance(experts, nn.Module):
                raise NotImplementedError(
                    f"the {families[index].name} MoE block of {name} has no '{families[index].experts}' module: "
                    "sapo.models.moe_families' layout for it is out of date")
            handles.append(block.register_forward_pre_hook(block_pre_hook(index), with_kwargs=True))
            handles.append(router.register_forward_hook(router_hook(index)))
            handles.append(experts.register_forward_pre_hook(experts_pre_hook(index), with_kwargs=True))
        yield record
    finally:
        for handle in handles:
            handle.remove()


def record_routing(
    model: nn.Module, *, with_logits: bool = False, keep_graph: bool = False
) -> contextlib.AbstractContextManager[RoutingRecord]:
    """Record each MoE layer's top-k experts during the forwards run inside the context.

    >>> with record_routing(model) as record:
    ...     model(input_ids=ids, attention_mask=mask)
    >>> routing = record.experts  # [L, B, T, k]; padding positions hold values that do not matter
    """
    return _routing_hooks(model, replay=None, with_logits=with_logits, keep_graph=keep_graph)


def replay_routing(
    model: nn.Module, routing: torch.Tensor, *, with_logits: bool = False, keep_graph: bool = False
) -> contextlib.AbstractContextManager[RoutingRecord]:
    """Force the experts in `routing` `[L, B, T, k]` (rows sliced to the micro-batch) in every
    forward inside the context; entries of -1 leave the choice to the current router.

    The yielded record holds the current router's *own* top-k (what it would have chosen), so
    routing diagnostics stay meaningful under replay. Run backward inside the context when
    activation checkpointing recomputes the forward.
    """
    return _routing_hooks(model, replay=routing, with_logits=with_logits, keep_graph=keep_graph)


def pad_routing(routing: torch.Tensor, length: int) -> torch.Tensor:
    """Extend `[L, B, T, k]` to `[L, B, length, k]` with -1 (R3: the last sampled token is never
    fed to the model, so generation records one position fewer than the full sequence)."""
    missing = length - routing.shape[2]
    if missing < 0:
        raise ValueError(f"routing covers {routing.shape[2]} positions, more than length={length}")
    fill = routing.new_full((*routing.shape[:2], missing, routing.shape[3]), UNSET)
    return torch.cat([routing, fill], dim=2)


def routing_changed_fraction(
    old_routing: torch.Tensor, new_routing: torch.Tensor, mask: torch.Tensor
) -> tuple[float, list[float]]:
    """Share of masked tokens whose top-k expert *set* differs (order-insensitive).

    old_routing, new_routing: [L, B, T, k]; mask: [B, T]. Returns (mean over layers, per layer).
    """
    if old_routing.shape != new_routing.shape:
        raise ValueError(f"routing shapes differ: {tuple(old_routing.shape)} vs {tuple(new_routing.shape)}")
    old_sorted = old_routing.sort(dim=-1).values
    new_sorted = new_routing.sort(dim=-1).values
    changed = (old_sorted != new_sorted).any(dim=-1).float()  # [L, B, T]
    weights = mask.to(changed.device, torch.float32)  # [B, T]
    per_layer = (changed * weights).sum(dim=(1, 2)) / weights.sum().clamp(min=1.0)  # [L]
    return per_layer.mean().item(), per_layer.tolist()


def replay_mismatch_fraction(replayed: torch.Tensor, used: torch.Tensor, mask: torch.Tensor) -> float:
    """Share of replayed tokens whose forward used another expert set than the replay forced: 0 when
    replay works. A token counts once per MoE layer, where it is in `mask` and its replayed entry is
    set (no -1: those are left to the router).

    replayed: [L, B, T, k] the routing passed to `replay_routing`; used: [L, B, T, k] that context's
    `record.used_experts`; mask: [B, T].
    """
    if replayed.shape != used.shape:
        raise ValueError(f"routing shapes differ: replayed {tuple(replayed.shape)} vs used {tuple(used.shape)}")
    used = used.to(replayed.device)
    counted = (replayed >= 0).all(dim=-1) & mask.to(replayed.device, torch.bool)[None]  # [L, B, T]
    differs = (replayed.long().sort(dim=-1).values != used.long().sort(dim=-1).values).any(dim=-1)  # [L, B, T]
    return (differs & counted).sum().item() / max(int(counted.sum()), 1)


def expert_load_entropy(routing: torch.Tensor, mask: torch.Tensor, num_experts: int) -> list[float]:
    """Per layer, the entropy of expert usage over masked tokens divided by log(E):
    1 = perfectly balanced load, 0 = every token goes to the same k experts."""
    if num_experts < 2:
        raise ValueError(f"num_experts must be >= 2, got {num_experts}")
    if routing.numel() and int(routing.max()) >= num_experts:
        raise ValueError(f"routing holds expert {int(routing.max())} but num_experts={num_experts}")
    selected = routing.long().clamp(min=0)  # [L, B, T, k]
    weights = mask.to(routing.device, torch.float32)[None, :, :, None] * (routing >= 0)  # skip -1 entries
    counts = torch.zeros(routing.shape[0], num_experts, device=routing.device)
    counts.scatter_add_(1, selected.flatten(1), weights.flatten(1))  # [L, E]
    probs = counts / counts.sum(dim=1, keepdim=True).clamp(min=1.0)
    entropy = -(probs * probs.clamp(min=1e-30).log()).sum(dim=1)  # [L]
    return (entropy / torch.log(torch.tensor(float(num_experts)))).tolist()


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The Switch Transformer load-balancing loss (Fedus et al. 2021, eq. 4-6) over all MoE layers:

        L_aux = E * sum_e f_e * P_e

    with f_e the share of (token, top-k slot) assignments that go to expert e and P_e the mean router
    probability of e, both over the real tokens of every layer taken together (as Hugging Face's
    Mixtral / Qwen3-MoE `load_balancing_loss_func`). It equals top_k for perfectly even routing and
    grows as routing concentrates. Gradients reach the routers through P_e.
    router_logits: per layer [N, E] (N = b * t tokens); mask: [N] bool, the tokens that count.
    """
    logits = torch.cat(router_logits, dim=0)  # [L * N, E]
    num_experts = logits.shape[-1]
    probs = F.softmax(logits, dim=-1, dtype=torch.float32)  # [L * N, E]
    chosen = probs.topk(top_k, dim=-1).indices  # [L * N, k]
    assigned = F.one_hot(chosen, num_experts).float()  # [L * N, k, E]
    if mask is None:
        weights = probs.new_ones(probs.shape[0])
    else:
        weights = mask.to(probs.device, torch.float32).flatten().repeat(len(router_logits))  # [L * N]
    total = weights.sum().clamp(min=1.0)
    f = (assigned * weights[:, None, None]).sum(dim=0) / total  # [k, E]
    p = (probs * weights[:, None]).sum(dim=0) / total  # [E]
    return num_experts * (f * p[None]).sum()
