"""RL against more supervised training for the same wall time, from the same warm start.

The built-in default's claim ("RL raises held-out Pass@1 by N points") only means something next to
what the warm start's own recipe would have reached with the same time. This script:
  1. reads an RL run's output_dir (config.yaml, metrics.jsonl): its warm start, its eval settings and
     its training wall time (the sum of time/step, plus eval time excluded on both sides);
  2. continues supervised training of the same warm-started model with the same recipe (same lr,
     batch, label smoothing; constant lr, a fresh optimizer) for that wall time;
  3. evaluates it with the RL run's evaluation (same problems, samples, temperature, seed);
  4. prints both gains.

    python bench/sft_vs_rl.py runs/sapo-default [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sapo.config import build_config
from sapo.evaluate import EvalSettings, evaluate_items
from sapo.rollout import make_engine
from sapo.tracking import read_metrics
from sapo.training.policy import load_policy
from sapo.training.tasks import load_task
from sapo.training.warmstart import WarmStartRecipe, builtin_sft_data, supervised_train


def sft_same_time(run: Path, *, threads: int = 1, seconds: float = 0.0, log=print) -> dict:
    """Continue the warm start of the RL run `run` with supervised training for the RL run's step time and
    evaluate it as the run was; {metric: {"warm_start", "rl", "sft"}} plus the times (also written to
    RUN/sft_vs_rl.json)."""
    torch.set_num_threads(threads)
    cfg = build_config(run / "config.yaml", {"output_dir": str(run), "resume": ""})
    if not cfg.model.startswith("builtin:"):
        raise SystemExit("this comparison needs a builtin:* model (its warm-start recipe is known)")
    rows = read_metrics(run)
    rl_seconds = sum(r.get("time/step", 0.0) for r in rows)
    evals = [r for r in rows if "eval/pass@1" in r]
    budget = seconds or rl_seconds

    policy = load_policy(cfg)  # the warm-started model, from the cache
    task = load_task(cfg, policy.tokenizer, policy.processor)
    recipe = WarmStartRecipe.from_config(cfg)
    prompt_ids, target_ids, extra = builtin_sft_data(policy.tokenizer, recipe, policy.processor)
    t0 = time.perf_counter()
    stats = supervised_train(
        policy.model, prompt_ids, target_ids, policy.pad_token_id, steps=10**9, batch_size=recipe.batch_size,
        lr=recipe.lr, seed=recipe.seed + 1, time_budget_s=budget, label_smoothing=recipe.label_smoothing,
        extra=extra,
    )
    sft_seconds = time.perf_counter() - t0

    engine = make_engine(cfg.engine, policy.model)
    result = evaluate_items(engine, policy, task.eval, task.correctness, EvalSettings.from_config(cfg),
                            generator=torch.Generator().manual_seed(cfg.seed * 7919 + cfg.max_steps))
    start, end = evals[0], evals[-1]
    keys = [k for k in start if k in end and k in result.metrics
            and (k in ("eval/pass@1", "eval/greedy") or k.startswith(("eval/pass@", "eval/pass@1_T")))]
    log(f"RL run: {run} ({len([r for r in rows if 'reward/mean' in r])} steps, {rl_seconds:.0f} s of steps)")
    log(f"SFT continued: {stats['steps']} steps in {sft_seconds:.0f} s (budget {budget:.0f} s), "
        f"final loss {stats['final_loss']:.4f}")
    log("")
    log("| metric | warm start | RL (end) | SFT, same time | RL gain | SFT gain |")
    log("|---|---:|---:|---:|---:|---:|")
    out = {}
    for key in keys:
        s, r, f = start[key], end[key], result.metrics[key]
        out[key] = {"warm_start": s, "rl": r, "sft": f}
        log(f"| {key} | {s:.3f} | {r:.3f} | {f:.3f} | {r - s:+.3f} | {f - s:+.3f} |")
    summary = {"rl_seconds": rl_seconds, "sft_seconds": sft_seconds, "sft_steps": stats["steps"], **out}
    (run / "sft_vs_rl.json").write_text(json.dumps(summary, indent=1))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="output_dir of a finished `sapo train` run on a builtin:* model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=0.0, help="override the SFT time budget")
    args = parser.parse_args()
    sft_same_time(Path(args.run_dir), threads=args.threads, seconds=args.seconds)


if __name__ == "__main__":
    main()
