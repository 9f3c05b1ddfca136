"""Data-parallel training on torch.distributed: `torchrun --nproc_per_node N -m sapo train ...`.

What each rank does (docs/scaling.md, "Our trainer on several GPUs"):
- takes a disjoint slice of each step's prompts (whole groups of G completions), rolls them out,
  scores them and computes group advantages locally: a group never straddles ranks;
- computes its share of the mini-batch loss with the GLOBAL normalisers (rows, unmasked tokens
  all-reduced over ranks, docs/objectives.md), so the ranks' losses add up to the loss of the whole
  mini-batch; gradients are averaged over ranks (FSDP's reduce-scatter, our all-reduce), so the
  loss is multiplied by the world size before backward: mean_r(W * dL_r) = sum_r dL_r = dL;
- `parallel=fsdp`: FSDP2 (`fully_shard`) on every decoder layer; the embedding, final norm and
  lm_head (tied on the tiny models, used outside the module forward by the fused log-prob head)
  stay replicated and their gradients are all-reduced. `parallel=ddp`: every weight replicated,
  gradients all-reduced in one flat buffer after the backward passes.
Only rank 0 writes files; checkpoints hold full (unsharded) state, so they load on any world size.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

PARALLEL_MODES = ("fsdp", "ddp")


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    parallel: str = "none"  # "none" (one process), "fsdp" or "ddp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def init_distributed(parallel: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, ...); one process: nothing to do.

    gloo on CPU, nccl when CUDA is available (each process on cuda:LOCAL_RANK).
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return DistInfo()
    if parallel not in ("auto", *PARALLEL_MODES):
        raise ValueError(f"parallel={parallel!r} is not one of auto, {', '.join(PARALLEL_MODES)}")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=60))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, "fsdp" if parallel == "auto" else parallel)


def check_divisible(prompts_per_step: int, num_generations: int, num_minibatches: int, world: int) -> None:
    """Every rank must hold whole groups and split its rows into equal mini-batches (equal collectives)."""
    if prompts_per_step % world:
        raise ValueError(f"prompts_per_step={prompts_per_step} must be a multiple of the number of processes "
                         f"({world}): each rank takes whole groups of num_generations completions")
    rows = prompts_per_step // world * num_generations
    if rows % num_minibatches:
        raise ValueError(f"each rank's {rows} rollout rows (prompts_per_step / processes * num_generations) must "
                         f"divide into num_minibatches={num_minibatches} equal mini-batches")


def rank_slice(items: list, info: DistInfo) -> list:
    """This rank's contiguous, disjoint share of a step's prompts."""
    per_rank = len(items) // info.world_size
    return items[info.rank * per_rank : (info.rank + 1) * per_rank]


def minibatch_rows(
    seed: int, step: int, num_prompts: int, num_generations: int, num_minibatches: int, info: DistInfo
) -> list[torch.Tensor]:
    """This rank's row indices of each mini-batch, the same split whatever the world size.

    Every global prompt's G rows are shuffled (one generator seeded from (seed, step), drawn for all
    prompts on every rank), laid end to end, and position j goes to mini-batch j % num_minibatches.
    A rank owns a contiguous range of positions, so with check_divisible every rank has the same number
    of rows in every mini-batch, and the union over ranks is the one-process mini-batch.
    """
    gen = torch.Generator().manual_seed((seed * 1_000_003 + step * 7_919) % 2**63)
    order = torch.cat([p * num_generations + torch.randperm(num_generations, generator=gen)
                       for p in range(num_prompts)])  # [P * G] global rows, group by group
    per_rank = len(order) // info.world_size
    start = info.rank * per_rank
    positions = torch.arange(start, start + per_rank)
    local = order[positions] - start  # rows of this rank's rollout tensors
    return [local[positions % num_minibatches == k] for k in range(num_minibatches)]


def rollout_seed(seed: int, step: int, info: DistInfo) -> int:
    """Per-rank, per-step sampling seed: ranks draw different completions, a resume draws the same."""
    return (seed * 1_000_003 + step * 65_537 + info.rank * 104_729 + 1) % 2**63


def global_counts(num_sequences: int, num_tokens: int) -> tuple[int, int]:
    """Rows and unmasked tokens of the mini-batch summed over ranks (one all-reduce)."""
    if world_size() == 1:
        return num_sequences, num_tokens
    counts = torch.tensor([num_sequences, num_tokens], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(counts)
    return int(counts[0]), int(counts[1])


def global_max(value: int) -> int:
    """The largest of value over ranks (one all-reduce)."""
    if world_size() == 1:
        return value
    t = torch.tensor([float(value)], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_true(flag: bool) -> bool:
    """True when flag is True on every rank (one all-reduce)."""
    if world_size() == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=_comm_device())
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() > 0)


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# The model: FSDP2 on the decoder layers, or replicated


def _fsdp_modules(model: torch.nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def prepare_model(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """Shard the decoder layers with FSDP2 (parallel=fsdp); parallel=ddp leaves the model replicated.

    Call before the optimizer is built (FSDP2 replaces the layers' parameters by sharded DTensors).
    The weights start equal on every rank: each rank loads the same checkpoint, and rank 0's copy
    is broadcast to be sure.
    """
    if not info.enabled:
        return model
    for tensor in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(tensor.data, src=0)
    if info.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        from sapo.models.forward import decoder_model

        layers = getattr(decoder_model(model), "layers", None)
        if layers is None:
            raise ValueError(f"parallel=fsdp needs a decoder with .layers; {type(model).__name__} has none "
                             "(use parallel=ddp)")
        for layer in layers:
            fully_shard(layer)
    return model


@contextlib.contextmanager
def gathered(model: torch.nn.Module):
    """Full weights on every rank for the duration (FSDP2: unsharded, kept through every forward).

    Generation and evaluation run a data-dependent number of forwards per rank; with the layers
    unsharded they need no collective, so ranks never wait on each other inside. All ranks must
    enter (the unshard is an all-gather).
    """
    modules = _fsdp_modules(model)
    if not modules:
        yield model
        return
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield model
    finally:
        for m in modules:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def sync_gradients(params: list[torch.nn.Parameter]) -> None:
    """Average the gradients of replicated parameters over ranks (FSDP's sharded ones already are)."""
    if world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None and not _is_dtensor(p.grad)]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])  # one all-reduce for all of them
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Global L2 norm of the gradients (clipped to max_norm when > 0), as torch's clip_grad_norm_.

    Sharded (DTensor) gradients contribute their local shard's squares, summed over ranks;
    replicated ones count once.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if world_size() == 1:
        if max_norm > 0:
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
    sharded = [g.to_local() for g in grads if _is_dtensor(g)]
    replicated = [g for g in grads if not _is_dtensor(g)]
    device = _comm_device()
    shard_sq = sum((s.float().pow(2).sum() for s in sharded), torch.zeros((), device=device))
    dist.all_reduce(shard_sq)
    replicated_sq = sum((g.float().pow(2).sum() for g in replicated), torch.zeros((), device=device))
    total = float((shard_sq + replicated_sq).sqrt())
    if max_norm > 0 and math.isfinite(total):
        coef = min(1.0, max_norm / (total + 1e-6))
        if coef < 1.0:
            for g in sharded + replicated:
                g.mul_(coef)
    return total


# ---------------------------------------------------------------------------------------------
# Metrics and checkpoints

# summed over ranks: each rank's loss is its share of the global sum; counters and throughput add up
SUM_PREFIXES = ("loss/", "reward/errors/", "reward/timeouts/", "math/", "tokens/")


def reduce_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """One row for the run: */min and */max exactly, losses summed, everything else averaged over ranks.

    Ranks hold equal numbers of rows, so a mean of per-rank means is the global mean; a std or
    quantile averaged over ranks is not the global one.
    """
    if world_size() == 1:
        return metrics
    rows: list[dict] = [{} for _ in range(world_size())]
    dist.all_gather_object(rows, metrics)
    from sapo.tracking import merge_metrics

    return merge_metrics(rows, sum_prefixes=SUM_PREFIXES)


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full trainable weights {name: cpu tensor} and the optimizer state in the one-process layout.

    Collective (every rank calls); rank 0 gets the state, the other ranks ({}, {}). The optimizer
    state comes back keyed by parameter index, as `optimizer.state_dict()` of the unsharded model, so
    a checkpoint loads on any world size.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    weights = get_model_state_dict(model, options=options)
    weights = {k: v.detach().cpu().clone() for k, v in weights.items() if k in names}
    by_name = get_optimizer_state_dict(model, optimizer, options=options)
    if rank() != 0:  # cpu_offload gathers the full state on rank 0 only
        return {}, {}
    index = {n: i for i, n in enumerate(names)}
    optim = {
        "state": {index[n]: s for n, s in by_name["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]],
    }
    return weights, optim


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, weights: dict, optim: dict) -> None:
    """Inverse of full_state: every rank passes the full state; each keeps its shard."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, strict=False)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    unexpected = sorted(set(weights) - set(names))
    if unexpected:
        raise RuntimeError(f"checkpoint has weights the model does not train: {unexpected[:5]}")
    set_model_state_dict(model, weights, options=options)
    by_name = {
        "state": {names[i]: s for i, s in optim["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in optim["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=options)


def any_true(flag: bool) -> bool:
    """True when flag is True on some rank (e.g. one rank got Ctrl-C: all stop at the same step)."""
    return not all_true(not flag)


@contextlib.contextmanager
def main_first(info: DistInfo):
    """Rank 0 runs the body first (e.g. builds the warm-start cache), the others after it."""
    if info.enabled and not info.is_main:
        dist.barrier()
    yield
    if info.enabled and info.is_main:
        dist.barrier()


def save_final_model(policy, path, info: DistInfo) -> None:
    """The trained model as a Hugging Face folder, written by rank 0 (collective under FSDP)."""
    from sapo.checkpoint import atomic_folder

    full = None
    if _fsdp_modules(policy.model):  # every rank takes part in gathering the full weights
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(policy.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if info.is_main:
        with atomic_folder(path) as tmp:  # a crash never leaves a half-written final_model/
            policy.save_final(tmp, state_dict=full)


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
