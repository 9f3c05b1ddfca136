"""The KL reference policy (beta > 0): the starting policy, kept one of two ways.

- `FrozenCopyReference`: a frozen deep copy of the model, taken before any update or sharding.
- `AdaptersOffReference` (LoRA): the policy's own base weights with the adapters switched off;
  no copy, because LoRA never changes the base weights.
"""

from __future__ import annotations

import copy

import torch

from sapo.training.batch import RolloutTensors
from sapo.training.teacher_forcing import TeacherForcing


class FrozenCopyReference:
    def __init__(self, model: torch.nn.Module):
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def logprobs(self, forward: TeacherForcing, tensors: RolloutTensors) -> torch.Tensor:
        """Reference log-probs [N, C] of every rollout row."""
        return forward.all_rows(self.model, tensors)


class AdaptersOffReference:
    def __init__(self, model: torch.nn.Module):
        self.model = model  # the live (peft-wrapped) policy

    def logprobs(self, forward: TeacherForcing, tensors: RolloutTensors) -> torch.Tensor:
        from sapo.models.lora import adapters_disabled

        with adapters_disabled(self.model):
            return forward.all_rows(self.model, tensors)


def make_reference(model: torch.nn.Module, *, lora: bool) -> FrozenCopyReference | AdaptersOffReference:
    """The reference for a policy: adapters off under LoRA, else a frozen copy of the weights now."""
    return AdaptersOffReference(model) if lora else FrozenCopyReference(model)
