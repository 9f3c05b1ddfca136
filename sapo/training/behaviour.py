"""What the behaviour policy (the weights that sampled the rollout) said about it, before any update.

The old log-probs come from one of two sources: a teacher-forced forward of the trainer's model
(`old_logprobs=recompute`, which also records the MoE experts pi_old chose, for R2 replay and
`moe/routing_changed`), or the sampler's own log-probs carried by the rollout (`old_logprobs=sampler`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from sapo.models import routing as moe
from sapo.training.batch import RolloutTensors, completion_positions
from sapo.training.teacher_forcing import TeacherForcing


@dataclass
class BehaviourPass:
    old_logprobs: torch.Tensor | None  # [N, C] float32, None when the update is on-policy
    routing: torch.Tensor | None = None  # [L, N, P + C, k] int, MoE experts chosen by pi_old
    replay: torch.Tensor | None = None  # [L, N, P + C, k] the experts the updates force (R2: routing; R3: sampler's)
    metrics: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def behaviour_pass(model, forward: TeacherForcing, tensors: RolloutTensors, *, need_old: bool, record: bool,
                   replay: str = "none", source: str = "recompute", measure_mismatch: bool = False) -> BehaviourPass:
    """Old log-probs and, with `record` (MoE), the experts they used.

    replay: "R2" forces pi_old's recorded experts in the updates ("R3" is filled in by the caller
    from the rollout). source: "recompute" or "sampler". measure_mismatch logs
    `mismatch/abs_log_ratio_mean` = mean |log pi_old - log pi_sampler| (the trainer/sampler gap).
    """
    if not (need_old or record):
        return BehaviourPass(None)
    if source == "sampler":
        # the sampler's own log-probs (logits / temperature, before any top-k/top-p filter) stand
        # in for a second forward: equal to rounding when the engine ran this model in float32
        mask = tensors.completion_mask
        return BehaviourPass(torch.where(mask, tensors.sampler_logprobs, 0.0).to(forward.device))
    was_training = model.training
    model.eval()
    old = torch.zeros(tensors.completion_mask.shape, dtype=torch.float32, device=forward.device)  # [N, C]
    routing, num_experts = None, 0
    for rows, part, left in forward.micro_batches(tensors, torch.arange(tensors.num_rows)):
        with moe.record_routing(model) if record else contextlib.nullcontext() as recorder:
            logp, _ = forward.logprobs(model, part)  # [b, C'] (trimmed)
        old[rows.to(forward.device), : logp.shape[1]] = logp
        if record:
            experts = recorder.experts  # [L, b, T', k]
            if routing is None:  # [L, N, P + C, k], positions no forward saw stay UNSET
                routing = experts.new_full(
                    (experts.shape[0], tensors.num_rows, tensors.input_ids.shape[1], experts.shape[3]), moe.UNSET)
            routing[:, rows.to(routing.device), left : left + experts.shape[2]] = experts
            num_experts = recorder.num_experts
    model.train(was_training)
    out = BehaviourPass(old, routing, replay=routing if replay == "R2" else None)
    if out.routing is not None:
        ent = moe.expert_load_entropy(out.routing, completion_positions(tensors), num_experts)
        out.metrics["moe/expert_load_entropy"] = float(sum(ent) / len(ent))
    if measure_mismatch:
        m = tensors.completion_mask.to(forward.device)
        diff = (out.old_logprobs - tensors.sampler_logprobs.to(forward.device))[m]
        out.metrics["mismatch/abs_log_ratio_mean"] = diff.abs().mean().item() if diff.numel() else 0.0
    return out
