"""What the loop trains on: tokenised prompts, gold answers, and the reward code.

Binds the data layer (examples, templates) to a tokenizer and the reward layer. Prompts longer
than max_prompt_length are skipped and counted, never truncated silently.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

from sapo.config import ConfigError, TrainConfig
from sapo.data.visual_task import VL_TASKS
from sapo.rewards import RewardRunner, math_reward

# every reward function failed on this many batches in a row (or on all batches so far): stop the run
MAX_FAILED_REWARD_BATCHES = 3


@dataclass
class PromptItem:
    prompt_text: str
    prompt_ids: list[int]
    answer: str
    extra: dict | None = None  # multimodal model inputs of this prompt (VL)


@dataclass
class TaskData:
    train: list[PromptItem]
    eval: list[PromptItem]
    rewards: RewardRunner  # training reward: weighted sum of the configured functions
    correctness: Callable  # evaluation: math equivalence, 1.0 or 0.0
    skipped: dict[str, int] = field(default_factory=dict)


BUILTIN_TASKS = ("builtin:arith", "builtin:arith-hard", "builtin:arith-neg", *VL_TASKS)  # with a held-out split of their own


def _load_examples(spec: str, cfg: TrainConfig, split: str, n: int):
    from sapo.data import builtin_dataset, load_dataset_spec

    if spec == "builtin:arith":
        return builtin_dataset(split, n, seed=cfg.seed)
    try:
        if spec.startswith(("reasoning_gym:", "builtin:")):
            extra = {"split": split, "n": n}
        else:  # files: where their images are, what a bad row does
            extra = {"images_field": cfg.images_field or None, "on_error": cfg.data_on_error}
        return load_dataset_spec(spec, prompt_field=cfg.prompt_field or None,
                                 answer_field=cfg.answer_field or None, seed=cfg.seed, **extra)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"dataset {spec!r}: {err}") from err


def tokenize_examples(examples, tokenizer, cfg: TrainConfig, processor=None) -> tuple[list[PromptItem], int]:
    from sapo.data.templates import build_prompt

    items, too_long = [], 0
    for ex in examples:
        text = build_prompt(ex, tokenizer, template=cfg.template)
        extra = None
        if getattr(ex, "images", None):
            from sapo.data.multimodal import encode_multimodal

            ids, extra = encode_multimodal(ex, text, processor)
        else:
            ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) > cfg.max_prompt_length:
            too_long += 1
            continue
        items.append(PromptItem(text, ids, str(ex.answer), extra))
    return items, too_long


def load_examples(cfg: TrainConfig, *, eval_only: bool = False) -> tuple[list, list]:
    """(train examples, eval examples), read and checked without a tokenizer: a bad data file is a
    ConfigError before any model is built or loaded."""
    train_examples = [] if eval_only else _load_examples(cfg.dataset, cfg, "train", cfg.train_size)
    eval_spec = cfg.eval_dataset or (cfg.dataset if cfg.dataset in BUILTIN_TASKS else "")
    eval_examples = _load_examples(eval_spec, cfg, "test", cfg.eval_num_problems) if eval_spec else []
    if cfg.eval_steps and eval_examples and len(eval_examples) > cfg.eval_num_problems:
        eval_examples = eval_examples[: cfg.eval_num_problems]
    return train_examples, eval_examples


def load_task(cfg: TrainConfig, tokenizer, processor=None, *, eval_only: bool = False,
              examples: tuple[list, list] | None = None) -> TaskData:
    """examples: what load_examples(cfg) returned, when the caller read the data first."""
    train_examples, eval_examples = examples if examples is not None else load_examples(cfg, eval_only=eval_only)
    train, train_long = tokenize_examples(train_examples, tokenizer, cfg, processor)
    evals, eval_long = tokenize_examples(eval_examples, tokenizer, cfg, processor)
    if train_long or eval_long:
        warnings.warn(f"skipped {train_long} training and {eval_long} evaluation prompts longer than "
                      f"max_prompt_length={cfg.max_prompt_length} tokens", stacklevel=2)
    if not train and not eval_only:
        raise ConfigError(f"dataset {cfg.dataset!r} has no usable prompts (after skipping {train_long} too long)")
    runner = RewardRunner(cfg.rewards, cfg.reward_weights or None, timeout_s=cfg.reward_timeout,
                          max_failed_batches=MAX_FAILED_REWARD_BATCHES)
    return TaskData(train, evals, runner, math_reward,
                    {"prompt_too_long/train": train_long, "prompt_too_long/eval": eval_long})
