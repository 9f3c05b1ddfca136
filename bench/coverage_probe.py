"""Step-0 probe for a built-in task with a coverage gap: greedy vs Pass@1 vs pass@8 of the warm start
on harder held-out problems than its worked solutions cover. Evaluation only (no RL).

    python bench/coverage_probe.py --min-ops 3 --max-ops 3 [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from sapo.config import build_config
from sapo.data.builtin import builtin_dataset
from sapo.evaluate import EvalSettings, evaluate_items
from sapo.rewards.math_reward import math_reward
from sapo.rollout import make_engine
from sapo.training.policy import load_policy
from sapo.training.tasks import tokenize_examples


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="builtin:arith-moe")
    p.add_argument("--min-ops", type=int, default=3)
    p.add_argument("--max-ops", type=int, default=3)
    p.add_argument("--operand-max", type=int, default=20)
    p.add_argument("--min-abs-answer", type=int, default=10)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--temps", default="0.3,0.5,0.7,1.0")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ws-hard-fraction", type=float, default=-1.0,
                   help=">= 0: build a warm start here whose worked solutions are this share hard (--ws-hard-ops)")
    p.add_argument("--ws-hard-ops", type=int, default=3)
    p.add_argument("--ws-steps", type=int, default=500)
    p.add_argument("--ws-label-smoothing", type=float, default=0.05)
    p.add_argument("--overrides", default="", help="k=v,k=v config overrides (e.g. warmstart_steps=800)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    over = dict(kv.split("=", 1) for kv in args.overrides.split(",") if kv)
    cfg = build_config(overrides={"model": args.model, **over})
    t0 = time.perf_counter()
    if args.ws_hard_fraction >= 0:
        cfg = build_config(overrides={"model": str(_mixed_warm_start(args)), **over})
    policy = load_policy(cfg)
    t_ws = time.perf_counter() - t0
    pool = builtin_dataset("test", 4 * args.n, seed=0, min_ops=args.min_ops, max_ops=args.max_ops,
                           operand_max=args.operand_max)
    examples = [e for e in pool if abs(int(e.answer)) >= args.min_abs_answer][: args.n]
    items, _ = tokenize_examples(examples, policy.tokenizer, cfg)
    engine = make_engine("torch", policy.model)
    out = {"model": args.model, "ops": [args.min_ops, args.max_ops], "operand_max": args.operand_max,
           "n": len(items), "overrides": over, "warm_start_s": round(t_ws, 1)}
    for t in [float(x) for x in args.temps.split(",")]:
        s = EvalSettings(num_samples=8, temperature=t, ks=(1, 8), greedy=(t == 1.0), max_new_tokens=cfg.max_completion_length)
        r = evaluate_items(engine, policy, items, math_reward, s,
                           generator=torch.Generator().manual_seed(0))
        out[f"T{t}"] = {k.split("/", 1)[1]: round(v, 3) for k, v in r.metrics.items()
                        if k.endswith(("pass@1", "pass@8", "greedy"))}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out), flush=True)


def _mixed_warm_start(args):
    """The built-in warm start's recipe on a mix: (1 - f) of the worked solutions 1-2 operations, f of
    them --ws-hard-ops operations. Cached under $SAPO_CACHE."""
    import random

    from sapo.data.builtin import BUILTIN_ALPHABET, reference_completion
    from sapo.models.char_tokenizer import build_char_tokenizer
    from sapo.models.loading import save_model
    from sapo.models.tiny import build_tiny_model
    from sapo.training.warmstart import cache_root, supervised_train

    folder = cache_root() / (f"gap-f{args.ws_hard_fraction}-ops{args.ws_hard_ops}-s{args.ws_steps}"
                             + (f"-ls{args.ws_label_smoothing}" if args.ws_label_smoothing != 0.05 else ""))
    if (folder / "config.json").exists():
        return folder
    n = 20000
    n_hard = int(round(args.ws_hard_fraction * n))
    easy = builtin_dataset("train", n - n_hard, seed=0)
    hard = builtin_dataset("train", n_hard, seed=1, min_ops=args.ws_hard_ops, max_ops=args.ws_hard_ops) if n_hard else []
    examples = list(easy) + list(hard)
    random.Random(0).shuffle(examples)
    tok = build_char_tokenizer(BUILTIN_ALPHABET)
    model = build_tiny_model("qwen3_moe", vocab_size=len(tok), seed=0)
    prompts = [tok.encode(e.prompt, add_special_tokens=False) for e in examples]
    targets = [tok.encode(reference_completion(e), add_special_tokens=False) + [tok.eos_token_id] for e in examples]
    stats = supervised_train(model, prompts, targets, tok.pad_token_id, steps=args.ws_steps, batch_size=64, lr=2e-3,
                             warmup=50, seed=0, label_smoothing=args.ws_label_smoothing, log_every=100)
    print(f"[probe] warm start {stats}", flush=True)
    save_model(model, tok, folder)
    return folder


if __name__ == "__main__":
    main()
