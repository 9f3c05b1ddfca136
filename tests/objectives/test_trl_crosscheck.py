"""Cross-check against TRL's GRPOTrainer loss (TRL 1.16), when trl is installed.

TRL's own `GRPOTrainer._compute_loss` runs on a trainer object that is built without __init__ (no model,
tokenizer or dataset): only its log-prob extraction is replaced by a function that returns our tensor, so
the loss path compared is TRL's real code. Skipped cleanly when trl does not import.
"""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from sapo.objectives import policy_loss

trl = pytest.importorskip("trl")
accelerate = pytest.importorskip("accelerate")
from trl import GRPOTrainer  # noqa: E402

# Our loss_type -> (TRL loss_type, importance_sampling_level, epsilon_low, epsilon_high)
CASES = {
    "sapo": ("sapo", "token", 0.2, 0.2),
    "grpo": ("grpo", "token", 0.2, 0.2),
    "dapo": ("dapo", "token", 0.2, 0.28),
    "dr_grpo": ("dr_grpo", "token", 0.2, 0.2),
    "gspo": ("grpo", "sequence", 3e-4, 4e-4),
    "cispo": ("cispo", "token", 0.2, 5.0),
}
L_MAX = 16


def trl_loss(loss_type, level, eps_low, eps_high, logprobs, old, advantages, mask, beta=0.0, ref=None):
    trainer = GRPOTrainer.__new__(GRPOTrainer)
    trainer.__dict__.update(
        loss_type=loss_type, importance_sampling_level=level, epsilon_low=eps_low, epsilon_high=eps_high,
        beta=beta, top_entropy_quantile=1.0, off_policy_mask_threshold=None, use_vllm=False,
        vllm_importance_sampling_correction=False, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        current_gradient_accumulation_steps=1, max_completion_length=L_MAX, model=torch.nn.Linear(1, 1).train(),
        accelerator=accelerate.Accelerator(cpu=True), _metrics={"train": defaultdict(list)},
        args=SimpleNamespace(sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, delta=None,
                             use_bias_correction_kl=False, steps_per_generation=1),
    )
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (logprobs, torch.zeros_like(logprobs), None)
    B, T = mask.shape
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask.long(),
        "advantages": advantages, "old_per_token_logps": old, "num_items_in_batch": mask.sum(),
    }
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    return GRPOTrainer._compute_loss(trainer, None, inputs)


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", sorted(CASES))
def test_loss_and_gradient_match_trl(loss_type, beta):
    gen = torch.Generator().manual_seed(0)
    B, T = 6, 9
    logprobs = -torch.rand(B, T, generator=gen) * 4
    spread = 1e-3 if loss_type == "gspo" else 0.5
    old = logprobs + spread * torch.randn(B, T, generator=gen)
    ref = logprobs + 0.3 * torch.randn(B, T, generator=gen)
    advantages = torch.randn(B, generator=gen)
    mask = torch.rand(B, T, generator=gen) > 0.3
    mask[:, 0] = True  # TRL's metrics divide by each row's length

    ours_lp = logprobs.clone().requires_grad_()
    options = {"max_completion_length": L_MAX} if loss_type == "dr_grpo" else {}
    if beta:
        options.update(beta=beta, ref_logprobs=ref)
    ours, _ = policy_loss(ours_lp, old, advantages, mask, loss_type, **options)
    ours.backward()

    trl_lp = logprobs.clone().requires_grad_()
    theirs = trl_loss(*CASES[loss_type], trl_lp, old, advantages, mask.float(), beta=beta, ref=ref if beta else None)
    theirs.backward()

    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-7)
    assert torch.allclose(ours_lp.grad, trl_lp.grad, rtol=1e-5, atol=1e-8)
