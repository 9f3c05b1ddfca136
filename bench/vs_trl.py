"""Whole RL step: ours (`sapo.train.train`) against TRL 1.16's GRPOTrainer, same model, task and work, on CPU.

Setup, identical for both:
- model: `build_tiny_model("qwen3_moe", vocab)` (1.8M parameters, seed 0) with the char tokenizer, saved
  once to a folder that both trainers load (same initial weights); float32, one torch thread.
- task: `builtin_dataset("train", TRAIN_SIZE, seed=0)`, the `math` reward (TRL: `trl_reward(math_reward)`).
- one generation batch = 32 prompts x 8 completions (256), at most 32 new tokens, temperature 1, then
  4 optimizer updates of 64 completions each (8 prompts x 8), loss_type "sapo", beta 0, AdamW, clip 1.0.
  Ours: prompts_per_step=32, num_generations=8, num_minibatches=4, micro_batch_size=0 (one forward per update).
  TRL: per_device_train_batch_size=64, gradient_accumulation_steps=1, steps_per_generation=4.
- precision: float32 on both sides by default. TRL 1.16's GRPOConfig defaults to bf16=True, which on
  CPU runs every forward (generation too) under bf16 autocast; we pass bf16=False so both do the same
  arithmetic. `--precision bf16` compares TRL's default against ours with autocast_bf16=on.
- old log-probs are really computed on both sides. Ours computes them whenever num_minibatches > 1.
  TRL computes them only when gradient_accumulation_steps % (steps_per_generation * num_iterations) != 0:
  here 1 % 4 = 1, so it runs the extra no-grad pass (with gradient_accumulation_steps=4 and
  steps_per_generation=4 it would skip it and its ratio would be exactly 1).

Timing: each trainer runs in its own subprocess (so its peak RSS, `ru_maxrss` at the end, is its own);
WARMUP generation batches, then MEASURED ones are timed. Ours: `time/step` of metrics.jsonl (rollout to
last optimizer step; setup, evaluation (eval_steps=0), logging and checkpoints excluded). TRL: a callback
timestamps the optimizer steps; a generation batch is the 4 optimizer steps from the one that generates
(`_generate_and_score_completions`, timed too) to the last update using it. Completion tokens/s = completion
tokens of the generation batch / its whole wall time. The two alternate REPEATS times each (the one that
goes first swaps every round); medians are reported, with the load average during the run (the 2-core
machine is shared).

Asynchronous rows (`--staleness 1,2`): ours with max_staleness=K, staleness_mode=async: the trainer
(one torch thread) and the sampler process (one torch thread) share the two cores; TRL gets `--threads`
torch threads (default 1; 2 gives it both cores). Memory: the summed PSS of every process of a trainer
(ours: trainer + sampler), read from /proc/PID/smaps_rollup at the end of the last step, beside peak RSS.
The last line reads `async K=1 vs TRL: <ratio>x per generation batch, memory <ratio>x`.

Run: .venv/bin/python bench/vs_trl.py [--repeats 3] [--precision fp32|bf16] [--staleness 1,2] [--threads 2]
(2-3 minutes per variant on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS, GENERATIONS, MINIBATCHES, MAX_NEW = 32, 8, 4, 32  # one generation batch: 256 completions, 4 updates
TRAIN_SIZE = 2000
WARMUP, MEASURED = 1, 2  # generation batches
LR = 1e-4


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def pss_mb(pid: int) -> float:
    """Proportional set size of one process (shared pages split between their users), MB."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def save_model_folder(path: Path) -> None:
    from sapo.data import BUILTIN_ALPHABET
    from sapo.models.char_tokenizer import build_char_tokenizer
    from sapo.models.loading import save_model
    from sapo.models.tiny import build_tiny_model

    tokenizer = build_char_tokenizer(BUILTIN_ALPHABET)
    model = build_tiny_model("qwen3_moe", len(tokenizer), seed=0)
    save_model(model, tokenizer, path)


# ---------------------------------------------------------------------------------------------
# Children: one trainer each


def run_ours(model_dir: Path, work: Path, precision: str, threads: int = 1, staleness: int = 0,
             old_logprobs: str = "recompute") -> dict:
    from sapo.config import build_config
    from sapo.train import train
    from sapo.training import async_sampler

    pss = {"mb": float("nan")}
    close = async_sampler.AsyncSampler.close

    def measured_close(self):  # the sampler process is still alive: both PSS now
        pss["mb"] = pss_mb(os.getpid()) + pss_mb(self.process.pid)
        close(self)

    async_sampler.AsyncSampler.close = measured_close

    cfg = build_config(None, {
        "model": str(model_dir), "dataset": "builtin:arith", "train_size": TRAIN_SIZE, "rewards": ["math"],
        "prompts_per_step": PROMPTS, "num_generations": GENERATIONS, "num_minibatches": MINIBATCHES,
        "micro_batch_size": 0, "max_completion_length": MAX_NEW, "temperature": 1.0, "loss_type": "sapo",
        "beta": 0.0, "lr": LR, "max_grad_norm": 1.0, "max_steps": WARMUP + MEASURED, "eval_steps": 0,
        "save_steps": 0, "threads": 1 if staleness else threads, "progress": False, "report": False,
        "tensorboard": False, "log_samples": 0, "output_dir": str(work / "ours"), "seed": 0,
        "autocast_bf16": "on" if precision == "bf16" else "off", "max_staleness": staleness,
        "staleness_mode": "async", "old_logprobs": old_logprobs,
    })
    train(cfg)
    if not staleness:
        pss["mb"] = pss_mb(os.getpid())
    rows = [json.loads(line) for line in (work / "ours" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["step"] > WARMUP]
    batch_s = [r["time/step"] for r in rows]
    tokens = [r["completion/length_mean"] * PROMPTS * GENERATIONS for r in rows]
    return {
        "batch_s": batch_s, "tokens": tokens,
        "rollout_s": [r["time/rollout"] for r in rows], "old_s": [r["time/old_logprobs"] for r in rows],
        "update_s": [r["time/update"] for r in rows], "peak_rss_mb": peak_rss_mb(), "pss_mb": pss["mb"],
        "trainer_wait_s": [r.get("async/trainer_wait_s", 0.0) for r in rows],
    }


def run_trl(model_dir: Path, work: Path, precision: str, threads: int = 1) -> dict:
    import torch
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from sapo.data import builtin_dataset
    from sapo.integrations.trl import examples_to_dataset, trl_reward
    from sapo.models.loading import load_model
    from sapo.rewards import math_reward

    torch.set_num_threads(threads)
    model, tokenizer = load_model(model_dir, dtype="float32")
    args = GRPOConfig(
        output_dir=str(work / "trl"), use_cpu=True, per_device_train_batch_size=PROMPTS * GENERATIONS // MINIBATCHES,
        gradient_accumulation_steps=1, steps_per_generation=MINIBATCHES, num_generations=GENERATIONS,
        max_completion_length=MAX_NEW, temperature=1.0, loss_type="sapo", beta=0.0, learning_rate=LR,
        max_grad_norm=1.0, max_steps=(WARMUP + MEASURED) * MINIBATCHES, logging_steps=MINIBATCHES,
        report_to="none", save_strategy="no", seed=0, dataloader_num_workers=0, bf16=precision == "bf16",
    )
    assert args.gradient_accumulation_steps % (args.steps_per_generation * args.num_iterations) != 0  # old logps
    trainer = GRPOTrainer(model=model, args=args, reward_funcs=[trl_reward(math_reward)],
                          train_dataset=examples_to_dataset(builtin_dataset("train", TRAIN_SIZE, seed=0)),
                          processing_class=tokenizer)

    stamps: list[tuple[float, float]] = []  # (begin, end) of each optimizer step
    generations: list[dict] = []

    class Stamps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            stamps.append((time.perf_counter(), float("nan")))

        def on_step_end(self, args, state, control, **kwargs):
            stamps[-1] = (stamps[-1][0], time.perf_counter())

    generate_and_score = trainer._generate_and_score_completions

    def timed_generate_and_score(inputs):  # rollout + rewards + old log-probs of one generation batch
        t0 = time.perf_counter()
        out = generate_and_score(inputs)
        generations.append({"s": time.perf_counter() - t0, "tokens": int(out["completion_mask"].sum()),
                            "old": out.get("old_per_token_logps") is not None})
        return out

    generate = trainer._generate
    rollout_s: list[float] = []

    def timed_generate(prompts):  # the rollout alone (transformers generate and its bookkeeping)
        t0 = time.perf_counter()
        out = generate(prompts)
        rollout_s.append(time.perf_counter() - t0)
        return out

    trainer._generate_and_score_completions = timed_generate_and_score
    trainer._generate = timed_generate
    trainer.add_callback(Stamps())
    trainer.train()
    assert len(generations) == WARMUP + MEASURED and all(g["old"] for g in generations), generations
    batch_s = []
    for b in range(WARMUP, WARMUP + MEASURED):
        first, last = stamps[b * MINIBATCHES], stamps[(b + 1) * MINIBATCHES - 1]
        batch_s.append(last[1] - first[0])
    measured = generations[WARMUP:]
    return {
        "batch_s": batch_s, "tokens": [g["tokens"] for g in measured],
        "generate_score_old_s": [g["s"] for g in measured], "rollout_s": rollout_s[WARMUP:],
        "peak_rss_mb": peak_rss_mb(), "pss_mb": pss_mb(os.getpid()),
    }


def child(which: str, model_dir: str, work: str, precision: str, threads: str) -> None:
    if which == "trl":
        result = run_trl(Path(model_dir), Path(work), precision, int(threads))
    else:  # "ours", "ours-async<K>" or "ours-async<K>-sampler" (pi_old = the sampler's log-probs)
        staleness = int(which.removeprefix("ours-async").removesuffix("-sampler") or 0) if which != "ours" else 0
        old = "sampler" if which.endswith("-sampler") else "recompute"
        result = run_ours(Path(model_dir), Path(work), precision, int(threads), staleness, old)
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------
# Parent: alternate the two, report medians


def spawn(which: str, model_dir: Path, root: Path, index: int, precision: str, threads: int) -> dict:
    work = root / f"{which}-{index}"
    work.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, __file__, "--child", which, str(model_dir), str(work), precision,
                           str(threads)], capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{which} child failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="subprocesses per trainer (alternating)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                        help="fp32: both in float32 (TRL bf16=False); bf16: TRL's default bf16=True (autocast, "
                             "generation included) against ours with autocast_bf16=on (log-prob passes only)")
    parser.add_argument("--staleness", default="", help="comma-separated max_staleness values for async rows (the "
                        "first also with old_logprobs=sampler, which skips the old log-prob forward)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of TRL and of our synchronous loop (the async rows use 1 + 1)")
    args = parser.parse_args()
    import torch
    import transformers
    import trl

    ks = [int(v) for v in args.staleness.split(",") if v]
    variants = ["ours", "trl"] + [f"ours-async{k}" for k in ks] + [f"ours-async{k}-sampler" for k in ks[:1]]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="sapo-vs-trl-") as tmp:
        root = Path(tmp)
        save_model_folder(root / "model")
        for repeat in range(args.repeats):
            order = variants if repeat % 2 == 0 else variants[::-1]  # who goes first swaps every round
            for which in order:
                result = spawn(which, root / "model", root, repeat, args.precision, args.threads)
                runs[which].append(result)
                loads.append(os.getloadavg()[0])
                print(f"  {which:<12} run {repeat}: {statistics.median(result['batch_s']):.2f} s/generation batch, "
                      f"peak RSS {result['peak_rss_mb']:.0f} MB, PSS {result['pss_mb']:.0f} MB, load {loads[-1]:.2f}",
                      flush=True)

    def summary(which: str) -> dict[str, float]:
        batch = [s for r in runs[which] for s in r["batch_s"]]
        speed = [n / s for r in runs[which] for n, s in zip(r["tokens"], r["batch_s"])]
        out = {"batch": statistics.median(batch), "update": statistics.median(batch) / MINIBATCHES,
               "tok_s": statistics.median(speed), "tokens": statistics.median(n for r in runs[which] for n in r["tokens"]),
               "rss": statistics.median(r["peak_rss_mb"] for r in runs[which]),
               "pss": statistics.median(r["pss_mb"] for r in runs[which])}
        return out

    ours, theirs = summary("ours"), summary("trl")
    print(f"\nsapo (ours) vs TRL {trl.__version__} GRPOTrainer, torch {torch.__version__}, transformers "
          f"{transformers.__version__}, CPU, {args.threads} torch thread(s) for TRL and our synchronous loop, "
          f"precision {args.precision}; {args.repeats} subprocesses each x {MEASURED} measured "
          f"generation batches (after {WARMUP} warm-up); medians")
    print(f"generation batch: {PROMPTS} prompts x {GENERATIONS} = {PROMPTS * GENERATIONS} completions, "
          f"<= {MAX_NEW} new tokens, {MINIBATCHES} optimizer updates of {PROMPTS * GENERATIONS // MINIBATCHES}")
    header = f"{'':<28}{'ours':>10}{'TRL':>10}{'TRL/ours':>10}"
    print(header)
    print("-" * len(header))
    rows = [("s per optimizer step", "update", "{:.3f}"), ("s per generation batch", "batch", "{:.3f}"),
            ("completion tokens / batch", "tokens", "{:.0f}"), ("completion tokens/s", "tok_s", "{:.0f}"),
            ("peak RSS MB", "rss", "{:.0f}"), ("PSS MB (all processes)", "pss", "{:.0f}")]
    for label, key, fmt in rows:
        print(f"{label:<28}{fmt.format(ours[key]):>10}{fmt.format(theirs[key]):>10}{theirs[key] / ours[key]:>10.2f}")
    parts = {k: statistics.median(s for r in runs["ours"] for s in r[k]) for k in ("rollout_s", "old_s", "update_s")}
    print(f"ours per batch: rollout {parts['rollout_s']:.3f} s, old log-probs {parts['old_s']:.3f} s, "
          f"{MINIBATCHES} updates {parts['update_s']:.3f} s")
    trl_gen = statistics.median(s for r in runs["trl"] for s in r["generate_score_old_s"])
    trl_rollout = statistics.median(s for r in runs["trl"] for s in r["rollout_s"])
    print(f"TRL per batch: rollout {trl_rollout:.3f} s; rollout + rewards + old log-probs {trl_gen:.3f} s; "
          f"{MINIBATCHES} updates {theirs['batch'] - trl_gen:.3f} s")
    print(f"rollout completion tokens/s: ours {ours['tokens'] / parts['rollout_s']:.0f}, "
          f"TRL {theirs['tokens'] / trl_rollout:.0f}")
    for which in variants[2:]:
        k = which.removeprefix("ours-async").replace("-sampler", " with old_logprobs=sampler")
        mine = summary(which)
        wait = statistics.median(s for r in runs[which] for s in r["trainer_wait_s"])
        print(f"async K={k}: {mine['batch']:.3f} s per generation batch (trainer waited {wait:.3f} s for the "
              f"sampler), {ours['batch'] / mine['batch']:.2f}x our synchronous loop, PSS {mine['pss']:.0f} MB")
        print(f"async K={k} vs TRL: {theirs['batch'] / mine['batch']:.2f}x per generation batch, "
              f"memory {mine['pss'] / theirs['pss']:.2f}x")
    print(f"load average (1 min) during the run: min {min(loads):.2f}, max {max(loads):.2f}, "
          f"median {statistics.median(loads):.2f} on {os.cpu_count()} cores (shared machine)")


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
    else:
        main()
