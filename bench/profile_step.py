"""Where the time of one of our RL steps goes: the bench/vs_trl.py setup, through `sapo.train.train`.

Tiny Qwen3-MoE (1.8M parameters), builtin:arith, 32 prompts x 8 completions, <= 32 new tokens,
num_minibatches=4 (4 updates of 64 rows), loss_type sapo, CPU, one torch thread. The run has
WARMUP + 1 steps; the last one is reported. The library is not modified: its functions are wrapped at
run time with wall-clock timers (CPU work is synchronous, so a timer around a call is its cost):

  rollout      TorchEngine.generate: prefill forward, decode forwards (forward hooks on the model),
               sample_tokens, the rest (cache row selection, masks, bookkeeping, .tolist())
  reward       Policy.decode of the completions + RewardRunner (math_reward in a thread)
  old logprobs behaviour_pass: backbone forward (with MoE routing recorded), log-prob head
  updates      policy_update x4: backbone forward, fused log-prob + loss head, backward, grad clip,
               AdamW step, diagnostics (policy_loss metrics, routing-changed fraction)
  rest         time/step minus the phases above: advantages, packing, metric dicts

`--ops` also runs torch.profiler over the reported step and prints the top operators by self CPU time
(the profiler slows the step; the phase table comes from the run without it).

Run: .venv/bin/python bench/profile_step.py [--ops]   (about 20 s)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.optim.optimizer as optimizer_hooks  # noqa: E402
from vs_trl import GENERATIONS, LR, MAX_NEW, MINIBATCHES, PROMPTS, TRAIN_SIZE, save_model_folder  # noqa: E402

import sapo.models.routing as routing  # noqa: E402
import sapo.rollout.torch_engine as torch_engine  # noqa: E402
import sapo.training.phases as phases  # noqa: E402
import sapo.training.policy as policy_module  # noqa: E402
import sapo.training.teacher_forcing as teacher_forcing  # noqa: E402
import sapo.training.update as update_module  # noqa: E402
from sapo.config import build_config  # noqa: E402
from sapo.rewards import RewardRunner  # noqa: E402
from sapo.tracking import RunLogger  # noqa: E402
from sapo.train import train  # noqa: E402

WARMUP = 1


class Timers:
    """Wall-clock seconds per (step, phase); a phase name is "top" or "top/part"."""

    def __init__(self):
        self.step = 0
        self.top: list[str] = []  # the enclosing top-level phase, if any
        self.seconds: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.calls: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def add(self, name: str, seconds: float) -> None:
        self.seconds[self.step][name] += seconds
        self.calls[self.step][name] += 1

    def path(self, part: str) -> str:
        return f"{self.top[0]}/{part}" if self.top else part

    def wrap(self, owner, attr: str, part: str, *, top: bool = False) -> None:
        original = getattr(owner, attr)
        timers = self

        def timed(*args, **kwargs):
            name = part if top else timers.path(part)
            if top:
                timers.top.append(part)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                timers.add(name, time.perf_counter() - start)
                if top:
                    timers.top.pop()

        setattr(owner, attr, timed)


def instrument(timers: Timers, profile_ops: bool) -> dict:
    """Wrap the library's phase functions with timers (run time only); returns the profiler holder."""
    holder: dict = {}
    generate = torch_engine.TorchEngine.generate

    def generate_step(self, *args, **kwargs):
        timers.step += 1
        if timers.step == WARMUP + 1:
            _hook_forward(self.model, timers)
            if profile_ops:
                holder["prof"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                holder["prof"].__enter__()
        return generate(self, *args, **kwargs)

    torch_engine.TorchEngine.generate = generate_step
    timers.wrap(torch_engine.TorchEngine, "generate", "rollout", top=True)
    timers.wrap(torch_engine, "sample_tokens", "sampling")
    timers.wrap(policy_module.Policy, "decode", "decode completions to text")
    timers.wrap(RewardRunner, "__call__", "reward", top=True)
    timers.wrap(phases, "behaviour_pass", "old logprobs", top=True)
    timers.wrap(phases, "policy_update", "updates", top=True)
    timers.wrap(teacher_forcing, "hidden_states", "backbone forward")
    timers.wrap(teacher_forcing, "token_logprobs", "log-prob head")
    timers.wrap(update_module, "fused_token_policy_loss", "fused log-prob + loss head (forward)")
    timers.wrap(update_module, "policy_loss", "diagnostics (policy_loss metrics)")
    timers.wrap(routing, "routing_changed_fraction", "diagnostics (routing changed)")
    timers.wrap(routing, "expert_load_entropy", "diagnostics (expert load entropy)")
    timers.wrap(torch.Tensor, "backward", "backward")
    timers.wrap(torch.nn.utils, "clip_grad_norm_", "grad clip")
    starts: dict[int, float] = {}
    optimizer_hooks.register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: starts.__setitem__(id(opt), time.perf_counter()))
    optimizer_hooks.register_optimizer_step_post_hook(
        lambda opt, args, kwargs: timers.add(timers.path("AdamW step"), time.perf_counter() - starts[id(opt)]))
    log = RunLogger.log

    def log_and_stop(self, step, metrics):
        if step == WARMUP + 1 and "prof" in holder:
            holder["prof"].__exit__(None, None, None)
        return log(self, step, metrics)

    RunLogger.log = log_and_stop
    return holder


def _hook_forward(model: torch.nn.Module, timers: Timers) -> None:
    """Prefill vs decode forwards of the engine: the model's own forward (the trainer calls the backbone)."""
    start: list[float] = []

    def pre(module, args, kwargs):
        start.append(time.perf_counter())

    def post(module, args, kwargs, output):
        ids = kwargs.get("input_ids")
        kind = "prefill forward" if ids is not None and ids.shape[1] > 1 else "decode forwards"
        timers.add(timers.path(kind), time.perf_counter() - start.pop())

    model.register_forward_pre_hook(pre, with_kwargs=True)
    model.register_forward_hook(post, with_kwargs=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", action="store_true", help="also print torch.profiler's top operators")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    timers = Timers()
    holder = instrument(timers, args.ops)
    with tempfile.TemporaryDirectory(prefix="sapo-profile-") as tmp:
        save_model_folder(Path(tmp) / "model")
        cfg = build_config(None, {
            "model": str(Path(tmp) / "model"), "dataset": "builtin:arith", "train_size": TRAIN_SIZE,
            "prompts_per_step": PROMPTS, "num_generations": GENERATIONS, "num_minibatches": MINIBATCHES,
            "max_completion_length": MAX_NEW, "loss_type": "sapo", "lr": LR, "max_steps": WARMUP + 1,
            "eval_steps": 0, "save_steps": 0, "threads": 1, "progress": False, "report": False,
            "tensorboard": False, "log_samples": 0, "output_dir": str(Path(tmp) / "run"), "seed": 0,
        })
        with contextlib.redirect_stderr(open(os.devnull, "w")):
            train(cfg)
        row = json.loads((Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    step = WARMUP + 1
    seconds, calls = timers.seconds[step], timers.calls[step]
    total = row["time/step"]
    tokens = row["completion/length_mean"] * PROMPTS * GENERATIONS
    print(f"one RL step (step {step}; {PROMPTS} x {GENERATIONS} completions, {tokens:.0f} completion tokens, "
          f"{MINIBATCHES} updates), tiny Qwen3-MoE, CPU, 1 thread, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print(f"{'phase':<52}{'s':>8}{'% step':>8}{'calls':>7}")
    print("-" * 75)
    accounted = 0.0
    for top in ("rollout", "decode completions to text", "reward", "old logprobs", "updates"):
        if top not in seconds:
            continue
        accounted += seconds[top]
        print(f"{top:<52}{seconds[top]:>8.3f}{100 * seconds[top] / total:>8.1f}{calls[top]:>7}")
        parts = sorted((k for k in seconds if k.startswith(top + "/")), key=lambda k: -seconds[k])
        for part in parts:
            print(f"  {part[len(top) + 1:]:<50}{seconds[part]:>8.3f}{100 * seconds[part] / total:>8.1f}"
                  f"{calls[part]:>7}")
        if parts:
            rest = seconds[top] - sum(seconds[p] for p in parts)  # the parts are disjoint calls
            print(f"  {'(rest: bookkeeping, masks, copies)':<50}{rest:>8.3f}{100 * rest / total:>8.1f}")
    print(f"{'rest of the step (advantages, packing, metrics)':<52}{total - accounted:>8.3f}"
          f"{100 * (total - accounted) / total:>8.1f}")
    print(f"{'time/step (metrics.jsonl)':<52}{total:>8.3f}{100.0:>8.1f}")
    if "prof" in holder:
        print("\ntorch.profiler, top operators of the step by self CPU time (profiler overhead included):")
        print(holder["prof"].key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=40))


if __name__ == "__main__":
    main()
