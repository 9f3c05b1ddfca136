"""Empty completions (no token at all, or only EOS) through the real tiny model's update: finite
loss and gradients for every objective, no skipped update, reward 0 (no answer)."""

from __future__ import annotations

import pytest
import torch

from sapo.config import build_config
from sapo.rewards.math_reward import MathReward
from sapo.rollout import RolloutBatch
from sapo.training.batch import pack_rollout
from sapo.training.behaviour import behaviour_pass
from sapo.training.policy import load_policy
from sapo.training.reference import make_reference
from sapo.training.teacher_forcing import ForwardSettings, TeacherForcing
from sapo.training.update import UpdateSettings, policy_update
from tests.reliability.conftest import WARMSTART_STEPS


@pytest.fixture(scope="module")
def policy(sapo_cache):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared, busy CPU: more threads only contend
    cfg = build_config(None, {"warmstart_steps": WARMSTART_STEPS, "beta": 0.01})
    yield load_policy(cfg)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("loss_type", ["sapo", "grpo", "dapo", "dr_grpo", "gspo", "cispo"])
@pytest.mark.parametrize("shape", ["all_empty", "eos_only", "mixed"])
def test_update_on_empty_completions_is_finite(policy, loss_type, shape):
    cfg = build_config(None, {"warmstart_steps": WARMSTART_STEPS, "loss_type": loss_type, "beta": 0.01,
                              "prompts_per_step": 2, "num_generations": 2, "num_minibatches": 1})
    eos = policy.eos_token_ids[0]
    completions = {"all_empty": [[], [], [], []], "eos_only": [[eos]] * 4, "mixed": [[], [eos], [], [5, eos]]}[shape]
    prompt = policy.tokenizer.encode("1+2=\n", add_special_tokens=False)
    batch = RolloutBatch([prompt] * 4, completions, [[-1.0] * len(c) for c in completions], [False] * 4)
    tensors = pack_rollout(batch, torch.tensor([1.0, -1.0, 0.5, -0.5]), policy.pad_token_id, False)
    forward = TeacherForcing(ForwardSettings.from_config(cfg), pad_token_id=policy.pad_token_id, device=policy.device)
    old = behaviour_pass(policy.model, forward, tensors, need_old=True, record=policy.is_moe)
    ref = make_reference(policy.model, lora=False).logprobs(forward, tensors)
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=1e-3)
    metrics = policy_update(policy.model, optimizer, forward, tensors, torch.arange(4), old, ref,
                            UpdateSettings.from_config(cfg), is_moe=policy.is_moe)
    assert "nonfinite" not in metrics
    assert torch.isfinite(torch.tensor([metrics["loss/total"], metrics["grad_norm"]])).all()
    if shape == "all_empty":  # nothing in the loss: no gradient at all
        assert metrics["loss/total"] == 0.0 and metrics["grad_norm"] == 0.0
    assert all(torch.isfinite(p).all() for p in policy.model.parameters())
    with torch.no_grad():  # leave the shared model as it was
        for n, p in policy.model.named_parameters():
            p.copy_(before[n])


def test_empty_completion_scores_zero():
    grader = MathReward(num_workers=1, use_math_verify=False)
    try:
        assert grader(["", ""], ["", "   "], ["3", "3"]) == [0.0, 0.0]
        assert grader.counters["no_answer"] == 2
    finally:
        grader.close()
