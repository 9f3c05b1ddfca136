"""Evaluation: Pass@1 as avg@n, unbiased pass@k, greedy accuracy.

Pass@1 here is the mean correctness over n samples per problem at the sampling temperature
(avg@n, as in the SAPO paper's "avg Pass@1 over 16 samples"). pass@k uses the unbiased
estimator 1 - C(n-c, k) / C(n, k) (Chen et al. 2021), averaged over problems.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from sapo.rollout.base import SamplingParams


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with n samples of which c are correct."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    # 1 - prod_{i=n-c+1}^{n} (1 - k/i): the stable product form of 1 - C(n-c,k)/C(n,k)
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


@dataclass
class EvalResult:
    metrics: dict[str, float]
    per_problem_correct: list[int]  # c per problem
    samples: list[dict]  # a few (prompt, completion, reward) rows for inspection


def summarize(correct: Sequence[Sequence[float]], ks: Sequence[int], prefix: str = "eval") -> dict[str, float]:
    """correct[i][j] in {0, 1}: problem i, sample j. Returns Pass@1 (avg@n) and pass@k."""
    if not correct:
        raise ValueError("no problems to summarise")
    n = len(correct[0])
    if any(len(row) != n for row in correct):
        raise ValueError("every problem needs the same number of samples")
    counts = [int(round(sum(row))) for row in correct]
    out = {
        f"{prefix}/pass@1": sum(c / n for c in counts) / len(counts),
        f"{prefix}/num_problems": float(len(counts)),
        f"{prefix}/num_samples": float(n),
    }
    for k in ks:
        if k == 1:
            continue
        out[f"{prefix}/pass@{k}"] = sum(pass_at_k(n, c, k) for c in counts) / len(counts)
    return out


@dataclass(frozen=True)
class EvalSettings:
    """How evaluation samples and what it reports (the eval_* config keys, resolved)."""

    num_samples: int = 8  # samples per problem: Pass@1 is avg@n
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 48
    ks: tuple[int, ...] = (1,)
    greedy: bool = True  # also greedy accuracy
    batch_rows: int = 512  # completions per generate call
    temperatures: tuple[float, ...] = ()  # temperature_sweep: Pass@1 at each (eval/pass@1_T<t>)

    @classmethod
    def from_config(cls, cfg, *, batch_rows: int | None = None) -> EvalSettings:
        """Evaluation samples from the training distribution (temperature, top_p, top_k) unless an
        eval_* key says otherwise (-1 = the training value)."""
        return cls(
            num_samples=cfg.eval_num_samples,
            temperature=cfg.temperature if cfg.eval_temperature < 0 else cfg.eval_temperature,
            top_p=cfg.top_p if cfg.eval_top_p < 0 else cfg.eval_top_p,
            top_k=cfg.top_k if cfg.eval_top_k < 0 else cfg.eval_top_k,
            max_new_tokens=cfg.max_completion_length, ks=tuple(int(k) for k in cfg.eval_pass_k),
            greedy=cfg.eval_greedy, batch_rows=batch_rows or cfg.eval_batch_size or 512,
            temperatures=tuple(float(t) for t in cfg.eval_temperatures),
        )


@torch.no_grad()
def evaluate(
    engine,
    prompt_ids: list[list[int]],
    prompts: list[str],
    answers: list[str],
    reward_fn: Callable[[list[str], list[str], list[str]], list[float]],
    decode: Callable[[list[int]], str],
    sampling: SamplingParams,
    settings: EvalSettings,
    *,
    extra_inputs: list[dict] | None = None,
    prefix: str = "eval",
    progress: Callable[[int], None] | None = None,
) -> EvalResult:
    """Sample settings.num_samples completions per problem with `sampling` (its generator is the
    stream), grade them with the training reward code; greedy accuracy with the same limits.
    `progress(n)` is called after each generate call with the number of completions it made."""
    if not (len(prompt_ids) == len(prompts) == len(answers)):
        raise ValueError("prompt_ids, prompts and answers must have the same length")
    num_samples, batch_rows = settings.num_samples, settings.batch_rows
    rows = [(i, j) for i in range(len(prompt_ids)) for j in range(num_samples)]
    correct = [[0.0] * num_samples for _ in prompt_ids]
    completions_text: dict[tuple[int, int], str] = {}
    lengths = []
    for start in range(0, len(rows), batch_rows):
        chunk = rows[start : start + batch_rows]
        batch = engine.generate([prompt_ids[i] for i, _ in chunk], sampling,
                                extra_inputs=[extra_inputs[i] for i, _ in chunk] if extra_inputs else None)
        texts = [decode(c) for c in batch.completion_ids]
        lengths += [len(c) for c in batch.completion_ids]
        scores = reward_fn([prompts[i] for i, _ in chunk], texts, [answers[i] for i, _ in chunk])
        for (i, j), text, score in zip(chunk, texts, scores):
            correct[i][j] = 1.0 if score >= 1.0 else 0.0
            completions_text[(i, j)] = text
        if progress is not None:
            progress(len(chunk))
    metrics = summarize(correct, settings.ks, prefix)
    metrics[f"{prefix}/completion_length"] = sum(lengths) / max(1, len(lengths))
    if settings.greedy:
        greedy_correct, greedy = 0, sampling.greedy_variant()
        for start in range(0, len(prompt_ids), batch_rows):
            idx = list(range(start, min(len(prompt_ids), start + batch_rows)))
            batch = engine.generate([prompt_ids[i] for i in idx], greedy,
                                    extra_inputs=[extra_inputs[i] for i in idx] if extra_inputs else None)
            texts = [decode(c) for c in batch.completion_ids]
            scores = reward_fn([prompts[i] for i in idx], texts, [answers[i] for i in idx])
            greedy_correct += sum(1 for s in scores if s >= 1.0)
            if progress is not None:
                progress(len(idx))
        metrics[f"{prefix}/greedy"] = greedy_correct / len(prompt_ids)
    samples = [
        {"prompt": prompts[i], "completion": completions_text[(i, 0)], "answer": answers[i], "correct": correct[i][0]}
        for i in range(min(8, len(prompt_ids)))
    ]
    return EvalResult(metrics, [int(round(sum(r))) for r in correct], samples)


def evaluate_items(engine, policy, items, correctness, settings: EvalSettings, *, generator: torch.Generator,
                   prefix: str = "eval", progress: Callable[[int], None] | None = None) -> EvalResult:
    """`evaluate` on the trainer's prompt items with the policy's EOS / padding ids. The one call the
    loop, `sapo eval` and the benchmarks share."""
    sampling = SamplingParams(
        max_new_tokens=settings.max_new_tokens, eos_token_ids=tuple(policy.eos_token_ids),
        pad_token_id=policy.pad_token_id, temperature=settings.temperature, top_p=settings.top_p,
        top_k=settings.top_k, generator=generator,
    )
    return evaluate(
        engine, [e.prompt_ids for e in items], [e.prompt_text for e in items], [e.answer for e in items],
        correctness, policy.decode, sampling, settings, prefix=prefix, progress=progress,
        extra_inputs=[e.extra or {} for e in items] if any(e.extra for e in items) else None,
    )


def temperature_key(prefix: str, temperature: float) -> str:
    """The metric name of Pass@1 at one temperature: eval/pass@1_T0.5, eval/pass@1_T1."""
    return f"{prefix}/pass@1_T{temperature:g}"


def temperature_sweep(engine, policy, items, correctness, settings: EvalSettings, *, generator: torch.Generator,
                      prefix: str = "eval", progress: Callable[[int], None] | None = None) -> dict[str, float]:
    """Pass@1 (avg@n, settings.num_samples per problem) at each of settings.temperatures, the other
    sampling settings unchanged. Why: a policy whose Pass@1 at T = 1 rises may only have become
    sharper; the warm start's best Pass@1 over temperatures is the bar that RL has to clear."""
    out = {}
    for t in settings.temperatures:
        at_t = replace(settings, temperature=t, ks=(1,), greedy=False)
        result = evaluate_items(engine, policy, items, correctness, at_t, generator=generator, prefix=prefix,
                                progress=progress)
        out[temperature_key(prefix, t)] = result.metrics[f"{prefix}/pass@1"]
    return out


def run_eval(cfg) -> dict[str, float]:
    """`sapo eval`: evaluate cfg.model on cfg.eval_dataset (comma-separated for several benchmarks)."""
    from sapo.config import ConfigError
    from sapo.data.visual_task import VL_TASKS
    from sapo.rollout import make_engine
    from sapo.training.policy import load_policy
    from sapo.training.tasks import BUILTIN_TASKS, load_task

    own_split = cfg.dataset in BUILTIN_TASKS and cfg.dataset not in VL_TASKS  # text tasks with a held-out split
    specs = [s for s in (cfg.eval_dataset or (cfg.dataset if own_split else "")).split(",") if s]
    if not specs:
        raise ConfigError("sapo eval needs eval_dataset=... (e.g. math500:../shared/data/math500/test.jsonl)")
    policy = load_policy(cfg)
    engine = make_engine(cfg.engine, policy.model)
    settings = EvalSettings.from_config(cfg, batch_rows=cfg.eval_batch_size or 64)  # small calls: visible progress
    table, all_metrics = [], {}
    for spec in specs:
        sub = type(cfg)(**{**cfg.__dict__, "eval_dataset": spec, "dataset": spec})
        task = load_task(sub, policy.tokenizer, policy.processor, eval_only=True)
        name = spec.split(":", 1)[0] if ":" in spec else spec
        total = len(task.eval) * (settings.num_samples * (1 + len(settings.temperatures)) + (1 if settings.greedy else 0))
        bar = _progress_bar(total, f"sapo eval {name}", enabled=cfg.progress)
        try:
            result = evaluate_items(engine, policy, task.eval, task.correctness, settings,
                                    generator=torch.Generator().manual_seed(cfg.seed), prefix=f"eval/{name}",
                                    progress=bar.update if bar is not None else None)
            result.metrics.update(temperature_sweep(
                engine, policy, task.eval, task.correctness, settings, prefix=f"eval/{name}",
                generator=torch.Generator().manual_seed(cfg.seed + 1), progress=bar.update if bar is not None else None))
        finally:
            if bar is not None:
                bar.close()
        all_metrics.update(result.metrics)
        table.append((name, result.metrics))
    ks = [int(k) for k in cfg.eval_pass_k if int(k) != 1]
    temps = settings.temperatures
    header = ("| benchmark | problems | Pass@1 (avg@n) |" + "".join(f" pass@{k} |" for k in ks) + " greedy |"
              + "".join(f" Pass@1 T={t:g} |" for t in temps))
    print(header)
    print("|---|---:|---:|" + "---:|" * len(ks) + "---:|" + "---:|" * len(temps))
    for name, m in table:
        p = f"eval/{name}"
        cells = "".join(f" {m.get(f'{p}/pass@{k}', float('nan')):.3f} |" for k in ks)
        print(f"| {name} | {int(m[f'{p}/num_problems'])} | {m[f'{p}/pass@1']:.3f} |{cells} "
              f"{m.get(f'{p}/greedy', float('nan')):.3f} |"
              + "".join(f" {m[temperature_key(p, t)]:.3f} |" for t in temps))
    return all_metrics


def _progress_bar(total: int, desc: str, *, enabled: bool):
    """A tqdm bar over completions (to stderr), or None when progress is off."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="completion", dynamic_ncols=True)
