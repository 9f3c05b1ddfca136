"""SapoGRPOTrainer (sapo.integrations.trl) against TRL 1.16's own GRPOTrainer, on a real tiny Qwen3.

The equality tests run TRL's real `GRPOTrainer._compute_loss` and ours on one trainer object, one batch and
one model, and compare the loss and every parameter's gradient. Skipped cleanly when trl is not installed.
"""

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from sapo.data.builtin import BUILTIN_ALPHABET, builtin_dataset  # noqa: E402
from sapo.integrations.trl import SapoGRPOTrainer, examples_to_dataset, trl_reward  # noqa: E402
from sapo.models.char_tokenizer import build_char_tokenizer  # noqa: E402
from sapo.models.tiny import build_tiny_model  # noqa: E402
from sapo.objectives import policy_loss  # noqa: E402
from sapo.rewards import math_reward  # noqa: E402

L_MAX = 8


def digit_fraction(prompts, completions, **columns):
    """A reward that differs between samples of an untrained model, so advantages are not all zero."""
    return [sum(char.isdigit() for char in text) / max(len(text), 1) for text in completions]


def make_trainer(output_dir, **config):
    tokenizer = build_char_tokenizer(BUILTIN_ALPHABET)
    model = build_tiny_model("qwen3", len(tokenizer))
    args = GRPOConfig(
        output_dir=str(output_dir), use_cpu=True, per_device_train_batch_size=4, num_generations=4,
        max_completion_length=L_MAX, learning_rate=1e-2, logging_steps=1, report_to="none", save_strategy="no",
        seed=0, **config,
    )
    dataset = examples_to_dataset(builtin_dataset("train", 32))
    return SapoGRPOTrainer(model=model, args=args, reward_funcs=[trl_reward(math_reward), digit_fraction],
                           train_dataset=dataset, processing_class=tokenizer)


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    return make_trainer(tmp_path_factory.mktemp("trl"), max_steps=1)


def make_inputs(trainer, B=5, P=4, T=L_MAX, seed=0):
    gen = torch.Generator().manual_seed(seed)
    vocab = trainer.model.config.vocab_size
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[1, :2] = 0  # left padding, as TRL pads prompts
    completion_mask = (torch.arange(T) < torch.randint(1, T + 1, (B,), generator=gen).unsqueeze(1)).long()
    inputs = {
        "prompt_ids": torch.randint(4, vocab, (B, P), generator=gen), "prompt_mask": prompt_mask,
        "completion_ids": torch.randint(4, vocab, (B, T), generator=gen), "completion_mask": completion_mask,
        "advantages": torch.randn(B, generator=gen),
        # TRL's count spans the generation batch (all micro-batches): deliberately not this batch's count
        "num_items_in_batch": completion_mask.sum() * 2 + 3,
    }
    with torch.no_grad():
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, input_ids, torch.cat([prompt_mask, completion_mask], 1), T)
    inputs["old_per_token_logps"] = logps + 0.3 * torch.randn(B, T, generator=gen)
    inputs["ref_per_token_logps"] = logps + 0.2 * torch.randn(B, T, generator=gen)
    return inputs


def loss_and_grads(model, compute):
    model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


# ours -> (TRL loss_type, importance_sampling_level, epsilon_low, epsilon_high)
CASES = {
    "sapo": ("sapo", "token", 0.2, 0.2),
    "grpo": ("grpo", "token", 0.2, 0.2),
    "dapo": ("dapo", "token", 0.2, 0.28),
    "dr_grpo": ("dr_grpo", "token", 0.2, 0.2),
    "cispo": ("cispo", "token", 0.2, 5.0),
    "gspo": ("grpo", "sequence", 3e-4, 4e-4),
}


@pytest.mark.parametrize(
    "objective, mode, options",
    [(name, "train", {}) for name in CASES]
    + [("sapo", "eval", {}), ("dapo", "eval", {}), ("sapo", "train", {"beta": 0.04}),
       ("sapo", "train", {"top_entropy_quantile": 0.5}), ("dapo", "train", {"beta": 0.04, "top_entropy_quantile": 0.5}),
       ("sapo", "train", {"off_policy_mask_threshold": 0.05})],
)
def test_loss_and_gradient_equal_trl(trainer, monkeypatch, objective, mode, options):
    loss_type, level, eps_low, eps_high = CASES[objective]
    beta = options.get("beta", 0.0)
    settings = dict(loss_type=loss_type, importance_sampling_level=level, epsilon_low=eps_low, epsilon_high=eps_high,
                    beta=0.0, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
                    current_gradient_accumulation_steps=2)
    for name, value in {**settings, **options}.items():
        monkeypatch.setattr(trainer, name, value, raising=False)  # the last one is set by train()
    monkeypatch.setattr(trainer.args, "steps_per_generation", 2)
    monkeypatch.setattr(trainer.args, "use_bias_correction_kl", False)
    trainer.set_objective(objective)
    trainer.model.train(mode == "train")
    inputs = make_inputs(trainer)
    if beta == 0:
        del inputs["ref_per_token_logps"]

    theirs, their_grads = loss_and_grads(trainer.model, lambda: GRPOTrainer._compute_loss(trainer, trainer.model, inputs))
    ours, our_grads = loss_and_grads(trainer.model, lambda: trainer._compute_loss(trainer.model, inputs))
    trainer.model.train()

    assert theirs.abs() > 1e-4  # a non-trivial loss
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-7)
    assert our_grads.keys() == their_grads.keys() and len(our_grads) > 0
    for name, grad in our_grads.items():
        assert torch.allclose(grad, their_grads[name], rtol=1e-4, atol=1e-7), name


def test_metrics_are_those_of_policy_loss(trainer, monkeypatch):
    monkeypatch.setattr(trainer, "current_gradient_accumulation_steps", 1, raising=False)
    trainer.set_objective("sapo", tau_neg=1.5)
    inputs = make_inputs(trainer, seed=1)
    trainer._metrics["train"].clear()
    trainer._compute_loss(trainer.model, inputs)

    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention, L_MAX)
    _, expected = policy_loss(logps, inputs["old_per_token_logps"], inputs["advantages"], inputs["completion_mask"],
                              "sapo", tau_neg=1.5)
    logged = trainer._metrics["train"]
    for name in ("sapo/gate_mean", "sapo/gate_mean_neg", "ratio/max", "loss/policy"):
        assert logged[name] == [pytest.approx(expected[name], rel=1e-5)], name
    assert 0 < logged["sapo/gate_mean"][0] < 1
    trainer.set_objective("sapo")


def test_set_objective_validates(trainer, monkeypatch):
    assert trainer.set_objective("dr_grpo").max_completion_length == L_MAX  # from GRPOConfig
    assert trainer.set_objective("gspo", epsilon=1e-3).epsilon_high == 1e-3
    with pytest.raises(ValueError, match="unknown loss_type"):
        trainer.set_objective("ppo")
    with pytest.raises(ValueError, match="contradicts GRPOConfig.beta"):
        trainer.set_objective("sapo", beta=0.1)
    monkeypatch.setattr(trainer, "_entropy_bonus_enabled", True)
    with pytest.raises(ValueError, match="entropy bonus"):
        trainer.set_objective("sapo")


def test_trl_reward_reads_the_answer_column():
    reward = trl_reward(math_reward)
    assert reward(prompts=["1+1=\n", "2*3=\n"], completions=["1+1=2 #### 2", "#### 5"], answer=["2", "6"],
                  completion_ids=[[1], [2]]) == [1.0, 0.0]
    assert reward.__name__ == "math_reward"
    with pytest.raises(ValueError, match="no 'answer' column"):
        reward(prompts=["1+1=\n"], completions=["#### 2"], solution=["2"])


def test_two_real_trl_steps_train_and_log_our_metrics(tmp_path):
    # num_iterations=2: the second step reuses the first step's generations, so the ratio moves away from 1
    trainer = make_trainer(tmp_path, max_steps=2, num_iterations=2)
    trainer.set_objective("sapo", tau_pos=1.0, tau_neg=1.05)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()

    changed = [name for name, p in trainer.model.named_parameters() if not torch.equal(before[name], p)]
    assert len(changed) == len(before)
    steps = [entry for entry in trainer.state.log_history if "sapo/gate_mean" in entry]
    assert [entry["step"] for entry in steps] == [1, 2]
    assert steps[0]["sapo/gate_mean"] == 1.0 and steps[0]["ratio/max"] == 1.0  # on-policy first update
    assert 0 < steps[1]["sapo/gate_mean"] < 1 and steps[1]["ratio/max"] > 1
    assert steps[1]["loss"] == pytest.approx(steps[1]["loss/total"], rel=1e-5)
