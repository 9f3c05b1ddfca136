"""Supervised warm start: the starting policy of the built-in CPU default.

RL needs a policy that sometimes succeeds. The built-in models are trained from scratch here,
with next-token cross-entropy on worked reference completions (prompt tokens masked), for a
short fixed budget, then cached as an ordinary Hugging Face folder so later runs start at once.
The same function continues supervised training for the "SFT for the same wall time" baseline.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

BUILTIN_MODELS = {
    # name -> (tiny arch, warm-start recipe); the recipe is part of the cache key
    "builtin:arith-moe": "qwen3_moe",
    "builtin:arith-dense": "qwen3",
    "builtin:vl-digits": "qwen3_vl",  # image prompts: builtin:vl-digits (sapo.data.visual_task)
    "builtin:vl-digits-moe": "qwen3_vl_moe",
}


@dataclass(frozen=True)
class WarmStartRecipe:
    steps: int = 500
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 50
    label_smoothing: float = 0.0
    seed: int = 0
    train_size: int = 20000
    hard_fraction: float = 0.0  # share of the worked solutions drawn from builtin:arith-hard (the rest: builtin:arith)
    teacher_sign_error: float = 0.0  # share of worked solutions with a negative result written sign-dropped (text or image)

    @classmethod
    def from_config(cls, cfg) -> WarmStartRecipe:
        """The recipe a TrainConfig asks for (its warmstart_* keys)."""
        return cls(steps=cfg.warmstart_steps, label_smoothing=cfg.warmstart_label_smoothing,
                   hard_fraction=cfg.warmstart_hard_fraction, teacher_sign_error=cfg.warmstart_teacher_sign_error)

    def cache_fields(self) -> dict:
        """The fields the cache key hashes: the later fields only when set, so older caches stay valid."""
        fields = asdict(self)
        for name in ("hard_fraction", "teacher_sign_error"):
            if not fields[name]:
                del fields[name]
        return fields


def cache_root() -> Path:
    return Path(os.environ.get("SAPO_CACHE", Path.home() / ".cache" / "sapo"))


def sft_batches(prompt_ids: list[list[int]], target_ids: list[list[int]], pad_id: int):
    """(input_ids, attention_mask, labels) with prompt and padding labels at -100, right-padded."""
    seqs = [p + t for p, t in zip(prompt_ids, target_ids)]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # [B, L]
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (p, s) in enumerate(zip(prompt_ids, seqs)):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention[i, : len(s)] = 1
        labels[i, len(p) : len(s)] = torch.tensor(s[len(p) :])
    return input_ids, attention, labels


def supervised_train(
    model,
    prompt_ids: list[list[int]],
    target_ids: list[list[int]],
    pad_id: int,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    warmup: int = 0,
    seed: int = 0,
    time_budget_s: float | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    log_every: int = 0,
    extra: list | None = None,
    label_smoothing: float = 0.0,
) -> dict:
    """Cross-entropy on target tokens only. Stops at `steps` or `time_budget_s`, whichever first.

    `extra`: per-example visual inputs (VL models, `sapo.data.multimodal`), batched with the prompts."""
    gen = torch.Generator().manual_seed(seed)
    model.train()
    if optimizer is None:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                      betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / max(1, warmup)) * (0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps))))
                                                          if time_budget_s is None else 1.0),
    )
    t0, done, losses = time.perf_counter(), 0, []
    while done < steps:
        if time_budget_s is not None and time.perf_counter() - t0 >= time_budget_s:
            break
        idx = torch.randint(len(prompt_ids), (batch_size,), generator=gen).tolist()
        input_ids, attention, labels = sft_batches([prompt_ids[i] for i in idx], [target_ids[i] for i in idx], pad_id)
        visual = {}
        if extra is not None:
            from sapo.data.multimodal import collate_extra

            visual = collate_extra([extra[i] for i in idx], input_ids.shape[1])  # prompts start at column 0
        logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False, **visual).logits  # [B, L, V]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100,
            label_smoothing=label_smoothing,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        sched.step()
        losses.append(loss.item())
        done += 1
        if log_every and done % log_every == 0:
            print(f"[sapo] warm start step {done}/{steps} loss {sum(losses[-log_every:]) / log_every:.4f}", flush=True)
    return {"steps": done, "seconds": time.perf_counter() - t0, "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:]))}


def builtin_sft_data(tokenizer, recipe: WarmStartRecipe, processor=None) -> tuple[list, list, list | None]:
    """(prompt ids, target ids ending in EOS, per-row image inputs or None) of the built-in task's
    worked solutions, as the warm start uses them: the image task when a VL processor is given."""
    if processor is not None:
        from sapo.data.visual_task import warmstart_inputs

        return warmstart_inputs(processor, recipe.train_size, seed=recipe.seed, teacher_sign_error=recipe.teacher_sign_error)
    import random

    from sapo.data.builtin import builtin_dataset, hard_dataset, reference_completion

    n_hard = int(round(recipe.hard_fraction * recipe.train_size))
    examples = list(builtin_dataset("train", recipe.train_size - n_hard, seed=recipe.seed))
    if n_hard:  # the few worked solutions of hard problems that exist, shuffled among the easy ones
        examples += list(hard_dataset("train", n_hard, seed=recipe.seed + 1))
        random.Random(recipe.seed).shuffle(examples)
    prompt_ids = [tokenizer.encode(e.prompt, add_special_tokens=False) for e in examples]
    completions = [reference_completion(e) for e in examples]
    if recipe.teacher_sign_error:  # a sloppy teacher: most worked solutions with a negative result drop its sign
        from sapo.data.builtin import has_negative_step, parse_prompt, sloppy_steps

        rng = random.Random(recipe.seed + 2)
        for i, e in enumerate(examples):
            problem = parse_prompt(e.prompt)
            if has_negative_step(*problem) and rng.random() < recipe.teacher_sign_error:
                completions[i] = sloppy_steps(*problem)[0]
    target_ids = [tokenizer.encode(c, add_special_tokens=False) + [tokenizer.eos_token_id] for c in completions]
    return prompt_ids, target_ids, None


def builtin_model_path(name: str, recipe: WarmStartRecipe | None = None, *, verbose: bool = True) -> Path:
    """The cached warm-started built-in model folder, built on first use (a couple of minutes on CPU)."""
    from sapo.data.builtin import BUILTIN_ALPHABET
    from sapo.models.char_tokenizer import build_char_tokenizer
    from sapo.models.loading import save_model
    from sapo.models.tiny import build_tiny_model

    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; choose one of {', '.join(BUILTIN_MODELS)}")
    recipe = recipe or WarmStartRecipe()
    arch = BUILTIN_MODELS[name]
    if arch.startswith("qwen3_vl"):  # the image task has no hard problems (the sloppy teacher applies to it)
        recipe = replace(recipe, hard_fraction=0.0)
    key = hashlib.sha256(json.dumps({"name": name, "alphabet": BUILTIN_ALPHABET, **recipe.cache_fields()},
                                    sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_root() / f"{name.split(':', 1)[1]}-{key}"
    if (folder / "config.json").exists():
        return folder
    if verbose:
        print(f"[sapo] building the warm-started {name} (once; cached in {folder})", flush=True)
    tokenizer = build_char_tokenizer(BUILTIN_ALPHABET)
    processor = None
    if arch.startswith("qwen3_vl"):  # image prompts (sapo.data.visual_task)
        from sapo.models.vl import BUILTIN_VL_OVERRIDES, build_tiny_vl

        model, processor = build_tiny_vl(arch, tokenizer, seed=recipe.seed, **BUILTIN_VL_OVERRIDES)
    else:
        model = build_tiny_model(arch, vocab_size=len(tokenizer), seed=recipe.seed)
    prompt_ids, target_ids, extra = builtin_sft_data(tokenizer, recipe, processor)
    stats = supervised_train(model, prompt_ids, target_ids, tokenizer.pad_token_id, steps=recipe.steps,
                             batch_size=recipe.batch_size, lr=recipe.lr, warmup=recipe.warmup, seed=recipe.seed,
                             log_every=100 if verbose else 0, extra=extra, label_smoothing=recipe.label_smoothing)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_model(model, tokenizer, tmp)
    if processor is not None:
        processor.save_pretrained(tmp)
    (tmp / "warm_start.json").write_text(json.dumps({"recipe": asdict(recipe), **stats}, indent=1))
    try:
        os.replace(tmp, folder)
    except OSError:  # another process built it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    if verbose:
        print(f"[sapo] warm start done: {stats['steps']} steps in {stats['seconds']:.0f}s, "
              f"loss {stats['final_loss']:.3f}", flush=True)
    return folder
