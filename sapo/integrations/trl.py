"""Our objectives inside TRL's GRPOTrainer (written against TRL 1.16).

    trainer = SapoGRPOTrainer(model=model, args=GRPOConfig(...), reward_funcs=[...], train_dataset=dataset,
                              processing_class=tokenizer, objective="sapo", objective_options={"tau_neg": 1.2})

TRL still generates, scores, computes advantages, reference log-probs and the optimizer step; only the
loss of `_compute_loss` is replaced by `sapo.objectives.policy_loss(..., objective, **objective_options)`,
and its metrics are logged next to TRL's (`sapo/gate_mean`, `ratio/mean`, `clip/frac`, ...).

Normalisers. TRL's loss is per process and per micro-batch, and TRL scales it for gradient accumulation
itself; the global loss is the DDP mean over processes of the sum over micro-batches. We pass the
normalisers that give the same loss as TRL's loss_type with the same aggregation:
  seq_mean_token_mean, seq_mean, seq_mean_token_sum_norm (TRL grpo/sapo, GSPO, dr_grpo):
      num_sequences = rows of this micro-batch * gradient accumulation steps (1 in eval)
  token_mean (TRL dapo/cispo):
      num_tokens = num_items_in_batch / num_processes * accumulation steps / steps_per_generation
      (num_items_in_batch counts the unmasked tokens of the whole generation batch, all processes; in eval
      the last two factors are dropped)
TRL's loss knobs (loss_type, epsilon, epsilon_high, sapo_temperature_*, importance_sampling_level) do not
reach our objective: pass ours in `objective_options`. `beta` comes from GRPOConfig (TRL computes the
reference log-probs only when beta != 0), and `max_completion_length` too when the objective needs it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from trl import GRPOTrainer

from sapo.objectives import LossSpec, objective_options, policy_loss, resolve

# Inputs that TRL's log-prob helper takes for multimodal models, passed through unchanged.
MULTIMODAL_KEYS = (
    "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
    "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids",
)


class SapoGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer with the policy loss of `sapo.objectives.policy_loss`.

    objective: any of `sapo.objectives.loss_types()` ("sapo", "grpo", "dapo", "dr_grpo", "gspo", "cispo", ...).
    objective_options: options of `policy_loss` (tau_pos, tau_neg, epsilon_low, epsilon_high, aggregation, ...).
    All other arguments are GRPOTrainer's.
    """

    def __init__(self, *args, objective: str = "sapo", objective_options: dict[str, Any] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.set_objective(objective, **(objective_options or {}))

    def set_objective(self, objective: str, **options) -> LossSpec:
        """Choose the objective (validated now, not at the first step) and return its LossSpec."""
        unsupported = {
            "entropy bonus (entropy_coef / use_adaptive_entropy)": self._entropy_bonus_enabled,
            "two-sided clipping (delta)": self.args.delta is not None,
            "use_bias_correction_kl with beta != 0 (our KL term is the plain k3 estimate)":
                self.beta != 0 and self.args.use_bias_correction_kl,
        }
        named = [name for name, used in unsupported.items() if used]
        if named:
            raise ValueError(f"SapoGRPOTrainer does not support {', '.join(named)}; turn it off in GRPOConfig "
                             "or use TRL's GRPOTrainer")
        beta = options.pop("beta", self.beta)
        if beta != self.beta:
            raise ValueError(f"objective option beta={beta} contradicts GRPOConfig.beta={self.beta}: set beta in "
                             "GRPOConfig (TRL computes reference log-probs only when it is non-zero)")
        options["beta"] = self.beta
        # plus what the objective declares it consumes from the run (Dr.GRPO: L_max = max_completion_length)
        options = objective_options(objective, options, max_completion_length=self.max_completion_length)
        spec = resolve(objective, **options)
        self.objective, self.objective_options, self.objective_spec = objective, options, spec
        return spec

    def objective_normalisers(self, inputs: dict[str, Any], mode: str) -> dict[str, float]:
        """num_sequences and num_tokens of this micro-batch that reproduce TRL's normalisers (module docstring)."""
        rows = inputs["completion_ids"].shape[0]
        tokens = inputs["num_items_in_batch"].float().clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            accumulation = self.current_gradient_accumulation_steps
            rows = rows * accumulation
            tokens = tokens * accumulation / self.args.steps_per_generation
        return {"num_sequences": rows, "num_tokens": tokens}

    def _compute_loss(self, model, inputs):
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        completion_mask = inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # [B, P + T]
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)  # [B, P + T]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]  # [B, T]

        logprobs, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled, **{key: inputs.get(key) for key in MULTIMODAL_KEYS},
        )  # [B, T] each
        old_logprobs = inputs.get("old_per_token_logps")
        old_logprobs = logprobs.detach() if old_logprobs is None else old_logprobs  # on-policy: ratio 1

        token_weights = self._token_weights(inputs, logprobs, old_logprobs, entropies, mask)
        mode = "train" if self.model.training else "eval"
        loss, metrics = policy_loss(
            logprobs, old_logprobs, inputs["advantages"], mask, self.objective,
            ref_logprobs=inputs.get("ref_per_token_logps"), token_weights=token_weights,
            **self.objective_normalisers(inputs, mode), **self.objective_options,
        )
        if self.aux_loss_enabled:  # MoE load balancing, scaled for accumulation like TRL does
            accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        self._log_objective_metrics(mode, metrics, entropies, mask)
        return loss

    def _token_weights(self, inputs, logprobs, old_logprobs, entropies, mask) -> torch.Tensor | None:
        """Product of TRL's optional per-token multipliers (entropy mask, off-policy mask, vLLM IS), or None."""
        weights = []
        if self.top_entropy_quantile < 1.0:
            weights.append(self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile))
        if self.off_policy_mask_threshold is not None:
            advantages = inputs["advantages"]
            weights.append(self.get_off_policy_mask(
                advantages.unsqueeze(1) if advantages.dim() == 1 else advantages, logprobs,
                inputs.get("sampling_per_token_logps", old_logprobs), mask, self.off_policy_mask_threshold,
            ))  # [B, 1]
        if self.use_vllm and self.vllm_importance_sampling_correction:
            weights.append(inputs["importance_sampling_ratio"])  # [B, T] or [B, 1]
        if not weights:
            return None
        product = torch.ones_like(logprobs, dtype=torch.float32)  # [B, T]
        for weight in weights:
            product = product * weight
        return product

    def _log_objective_metrics(self, mode: str, metrics: dict[str, float], entropies, mask) -> None:
        """Append our metrics to TRL's `_metrics[mode]`, reduced over processes: min for */min, max for */max,
        otherwise the mean of the per-process values (exact for means only when processes hold equal counts)."""
        local_entropy = torch.stack([(entropies * mask).sum(), mask.sum().float()])
        totals = self.accelerator.reduce(local_entropy, reduction="sum")
        self._metrics[mode]["entropy"].append((totals[0] / totals[1].clamp(min=1.0)).item())
        if not metrics:
            return
        names = list(metrics)
        values = torch.tensor([metrics[name] for name in names], device=self.accelerator.device)  # [M]
        gathered = self.accelerator.gather(values.unsqueeze(0))  # [P, M]
        finite = ~torch.isnan(gathered)
        reduced = {
            "min": torch.where(finite, gathered, torch.inf).min(0).values,
            "max": torch.where(finite, gathered, -torch.inf).max(0).values,
            "mean": gathered.nanmean(0),
        }
        for i, name in enumerate(names):
            kind = name.rsplit("/", 1)[-1] if name.endswith(("/min", "/max")) else "mean"
            value = reduced[kind][i].item() if finite[:, i].any() else float("nan")
            self._metrics[mode][name].append(value)


def trl_reward(reward_fn: Callable[[Sequence, Sequence, Sequence], list[float]], answer_column: str = "answer"):
    """Our reward signature `(prompts, completions, answers) -> list[float]` as a TRL reward function.

    TRL calls reward functions with keyword arguments: prompts, completions, completion_ids and every other
    dataset column; the gold answers are read from `answer_column`.
    """
    def reward(prompts, completions, **columns) -> list[float]:
        if answer_column not in columns:
            raise ValueError(f"the dataset has no {answer_column!r} column for the gold answers; columns: "
                             f"{sorted(columns)}; pass answer_column=")
        return reward_fn(prompts, completions, columns[answer_column])

    reward.__name__ = getattr(reward_fn, "__name__", "reward")
    return reward


def examples_to_dataset(examples: Sequence):
    """`datasets.Dataset` with TRL's "prompt" column and an "answer" column, from our `Example`s."""
    from datasets import Dataset

    return Dataset.from_dict({
        "prompt": [example.prompt for example in examples],
        "answer": [example.answer for example in examples],
    })
