"""The phases of one RL step, in the order the loop calls them (sapo/train.py):

    collect -> score -> advantages -> behaviour -> optimize -> sync_weights

Each takes the few values it needs and returns a small typed value for the next one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from sapo import distributed
from sapo.models import routing as moe_routing
from sapo.rollout import RolloutBatch, RolloutEngine, SamplingParams
from sapo.training.batch import (
    RolloutTensors,
    completion_positions,
    group_advantages,
    merge_metrics,
    pack_rollout,
    select_rows,
)
from sapo.training.behaviour import BehaviourPass, behaviour_pass
from sapo.training.policy import Policy
from sapo.training.staleness import RolloutRequest
from sapo.training.tasks import PromptItem, TaskData
from sapo.training.teacher_forcing import TeacherForcing
from sapo.training.update import UpdateSettings, policy_update


@dataclass
class Rollout:
    """1. collect: G completions for each of the step's prompts (this rank's slice of whole groups)."""

    examples: list[PromptItem]  # [P]
    batch: RolloutBatch  # [P * G] rows, group by group
    row_extra: list[dict]  # per-row visual inputs (VL), [] for text-only batches
    seconds: float

    def per_row(self, values: list, group_size: int) -> list:
        return [v for v in values for _ in range(group_size)]


def step_prompts(task: TaskData, prompt_indices: list[int], num_generations: int):
    """The step's prompts repeated G times: (examples [P], prompt_ids [P * G], row_extra [P * G] or [])."""
    examples = [task.train[i] for i in prompt_indices]
    prompt_ids = [e.prompt_ids for e in examples for _ in range(num_generations)]
    row_extra = [e.extra or {} for e in examples for _ in range(num_generations)]
    return examples, prompt_ids, row_extra if any(row_extra) else []


def collect(engine: RolloutEngine, policy: Policy, task: TaskData, prompt_indices: list[int], *,
            num_generations: int, sampling: SamplingParams) -> Rollout:
    examples, prompt_ids, row_extra = step_prompts(task, prompt_indices, num_generations)
    t0 = time.perf_counter()
    with distributed.gathered(policy.model):  # FSDP: full layers, so ranks decode different lengths freely
        batch = engine.generate(prompt_ids, sampling, extra_inputs=row_extra or None)
    return Rollout(examples, batch, row_extra, time.perf_counter() - t0)


def collect_lagged(source, request: RolloutRequest, task: TaskData, prompt_indices: list[int],
                   num_generations: int) -> tuple[Rollout, dict[str, float]]:
    """max_staleness > 0: the step's batch from the lagging sampler (sampled now, or ahead of time in
    another process), with its async/* timings."""
    examples, prompt_ids, row_extra = step_prompts(task, prompt_indices, num_generations)
    if prompt_ids != request.prompt_ids:
        raise RuntimeError(f"step {request.step}: the sampler was asked for other prompts than the step draws")
    sampled = source.get(request)
    return Rollout(examples, sampled.batch, row_extra, sampled.seconds), sampled.metrics


@dataclass
class Scored:
    """2. score: the completions' text and rewards (the same reward code as evaluation)."""

    prompts: list[str]  # [P * G]
    completions: list[str]  # [P * G]
    answers: list[str]  # [P * G]
    rewards: torch.Tensor  # [P, G]
    total: list[float]  # [P * G] the weighted reward per row
    metrics: dict[str, float]  # the reward runner's per-function means, errors, timeouts
    seconds: float


def score(rollout: Rollout, task: TaskData, decode: Callable[[list[int]], str], num_generations: int) -> Scored:
    texts = [decode(c) for c in rollout.batch.completion_ids]
    prompts = rollout.per_row([e.prompt_text for e in rollout.examples], num_generations)
    answers = rollout.per_row([e.answer for e in rollout.examples], num_generations)
    t0 = time.perf_counter()
    out = task.rewards(prompts, texts, answers)
    seconds = time.perf_counter() - t0
    rewards = torch.tensor(out.total, dtype=torch.float32).view(len(rollout.examples), num_generations)
    return Scored(prompts, texts, answers, rewards, list(out.total), out.metrics, seconds)


@dataclass
class Advantaged:
    """3. advantages: group-normalised A per row, the rows that train, and the padded tensors."""

    advantages: torch.Tensor  # [P, G]
    keep_rows: torch.Tensor  # [n] rows that enter the updates
    tensors: RolloutTensors  # the kept rows, padded
    metrics: dict[str, float]


def advantages(rollout: Rollout, scored: Scored, *, scale_rewards: str, drop_equal_groups: bool, pad_token_id: int,
               mask_truncated: bool) -> Advantaged:
    rewards, batch = scored.rewards, rollout.batch
    adv = group_advantages(rewards, scale_rewards)  # [P, G]
    equal = rewards.max(dim=1).values == rewards.min(dim=1).values  # [P]
    keep_rows = torch.arange(rewards.numel())
    if drop_equal_groups:
        keep_rows = (~equal).repeat_interleave(rewards.shape[1]).nonzero().flatten()
    tensors = pack_rollout(batch, adv.flatten(), pad_token_id, mask_truncated)
    tensors.extra = rollout.row_extra
    if len(keep_rows) > 0:
        tensors = select_rows(tensors, keep_rows)
    metrics = {
        "reward/mean": rewards.mean().item(),
        "reward/std": rewards.std().item() if rewards.numel() > 1 else 0.0,
        "groups/equal_reward_frac": equal.float().mean().item(),
        "completion/length_mean": float(np.mean([len(c) for c in batch.completion_ids])),
        "completion/length_max": float(max(len(c) for c in batch.completion_ids)),
        "completion/truncated_frac": float(np.mean(batch.truncated)),
        "advantage/abs_mean": adv.abs().mean().item(),
    }
    return Advantaged(adv, keep_rows, tensors, metrics)


@dataclass
class Behaviour:
    """4. behaviour: pi_old's log-probs (and experts), the reference's log-probs, before any update."""

    old: BehaviourPass
    ref_logprobs: torch.Tensor | None  # [n, C]
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def behaviour(policy: Policy, forward: TeacherForcing, reference, rollout: Rollout, adv: Advantaged, *,
              need_old: bool, routing_replay: str, old_logprobs: str, tis_cap: float) -> Behaviour:
    t0 = time.perf_counter()
    tensors = adv.tensors
    record = policy.routing_recordable and (need_old or routing_replay != "none")
    old = behaviour_pass(policy.model, forward, tensors, need_old=need_old, record=record, replay=routing_replay,
                         source=old_logprobs, measure_mismatch=tis_cap > 0)
    ref_logprobs = reference.logprobs(forward, tensors) if reference is not None else None
    metrics = dict(old.metrics)
    if routing_replay == "R3":
        old.replay = generation_routing(rollout.batch, tensors)[:, adv.keep_rows]
        if old.routing is not None:  # the sampler's experts against pi_old's, before any update
            fed = (old.replay >= 0).all(dim=3).all(dim=0)  # [N, P + C]: the sampler never fed an EOS
            metrics["moe/r3_mismatch"], _ = moe_routing.routing_changed_fraction(
                old.replay, old.routing, completion_positions(tensors) & fed)
    return Behaviour(old, ref_logprobs, metrics, time.perf_counter() - t0)


def generation_routing(batch: RolloutBatch, tensors: RolloutTensors) -> torch.Tensor:
    """The experts the rollout engine chose, [L, N, P + C, k] in the columns of the packed rollout
    (the engine's cover P + max_new_tokens - 1: the last sampled token was never fed; -1 = unset)."""
    if batch.routing is None:
        raise ValueError("routing_replay=R3 needs the experts chosen during generation, and the rollout engine "
                         "returned none (sample with record_experts=True)")
    routing, width = batch.routing, tensors.input_ids.shape[1]
    return routing[:, :, :width] if routing.shape[2] >= width else moe_routing.pad_routing(routing, width)


@dataclass
class Optimized:
    """5. optimize: the step's updates."""

    metrics: dict[str, float]  # merged over the updates
    applied: int  # updates that changed the weights
    skipped: int  # non-finite updates skipped
    nonfinite_run: int  # non-finite updates in a row at the end of the step
    seconds: float


class TooManyNonFinite(RuntimeError):
    pass


def optimize(policy: Policy, forward: TeacherForcing, optimizer, scheduler, adv: Advantaged, beh: Behaviour,
             minibatches: list[torch.Tensor], settings: UpdateSettings, *, nonfinite_run: int, max_nonfinite: int,
             after_update: Callable[[], None] = lambda: None) -> Optimized:
    """num_minibatches sequential updates over the rollout rows. A non-finite update is skipped
    (weights untouched, scheduler not stepped); `max_nonfinite` in a row raise TooManyNonFinite."""
    t0 = time.perf_counter()
    rows_metrics, applied, skipped = [], 0, 0
    for rows in minibatches:
        if len(rows) == 0:
            continue
        m = policy_update(policy.model, optimizer, forward, adv.tensors, rows, beh.old, beh.ref_logprobs, settings,
                          is_moe=policy.is_moe)
        after_update()
        if m.pop("nonfinite", 0.0):
            skipped += 1
            nonfinite_run += 1
            if nonfinite_run >= max_nonfinite:
                raise TooManyNonFinite(nonfinite_run)
        else:
            nonfinite_run = 0
            applied += 1
            scheduler.step()
        rows_metrics.append(m)
    return Optimized(merge_metrics(rows_metrics), applied, skipped, nonfinite_run, time.perf_counter() - t0)


def sync_weights(engine: RolloutEngine, model: torch.nn.Module, version: int) -> float:
    """6. sync: tell the rollout engine about the new weights (copy them in when it owns a copy);
    returns the seconds it took."""
    t0 = time.perf_counter()
    if engine.owns_weights:
        with distributed.gathered(model), torch.no_grad():
            engine.load_weights(((n, p.detach()) for n, p in model.named_parameters()), version=version)
    else:
        engine.load_weights(None, version=version)
    return time.perf_counter() - t0
