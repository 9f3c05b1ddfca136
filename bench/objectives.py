"""Benchmark: forward + backward of sapo.objectives.policy_loss against a plain reference, on CPU.

B = 64 sequences x T = 4096 tokens (float32, ~2/3 of tokens unmasked), for sapo, grpo, gspo and cispo.
The reference is the straightforward PyTorch written below (mask products, no protection against
NaN/inf in padding, no metrics). Timing: one torch thread (the dev machine's 2 cores are shared, and
a second thread only adds noise at this size); ours and the reference alternate in one process;
median of REPEATS runs each. "+metrics" is ours with the diagnostics dict as well, timed in a separate loop.
Memory: each (objective, implementation) runs in a fresh subprocess with MALLOC_MMAP_THRESHOLD_=65536,
so glibc serves every tensor above 64 KiB with mmap and returns it on free: RSS then follows the live
tensor bytes. We report the peak RSS increase of one forward + backward: after a warm-up run, the RSS
high-water mark is reset (/proc/self/clear_refs), and VmHWM after the measured run minus VmRSS before
it is the figure (Linux only). One input tensor is 1 MiB.

Run: .venv/bin/python bench/objectives.py   (about a minute on 2 cores)
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sapo.objectives import policy_loss  # noqa: E402

B, T = 64, 4096
REPEATS = 31
OBJECTIVES = ("sapo", "grpo", "gspo", "cispo")


def make_inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(B, T, generator=gen) * 4
    old = logprobs + 0.05 * torch.randn(B, T, generator=gen)
    advantages = torch.randn(B, generator=gen)
    lengths = torch.randint(T // 3, T + 1, (B,), generator=gen)
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)  # [B, T] right padding
    return logprobs, old, advantages, mask


def reference_loss(loss_type, logprobs, old, advantages, mask):
    """Plain PyTorch, the way the formulas read (TRL-style products with the float mask)."""
    maskf = mask.float()
    lengths = maskf.sum(-1).clamp(min=1.0)
    log_ratio = (logprobs - old).clamp(-20.0, 20.0)
    A = advantages.unsqueeze(-1)
    if loss_type == "gspo":
        seq_log_ratio = (log_ratio * maskf).sum(-1) / lengths
        s = torch.exp(seq_log_ratio)
        seq_loss = -torch.minimum(s * advantages, s.clamp(1 - 3e-4, 1 + 4e-4) * advantages)
        return seq_loss.mean()
    ratio = torch.exp(log_ratio)
    if loss_type == "sapo":
        tau = torch.where(A > 0, 1.0, 1.05)
        per_token = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * A
    elif loss_type == "grpo":
        per_token = -torch.minimum(ratio * A, ratio.clamp(0.8, 1.2) * A)
    elif loss_type == "cispo":
        per_token = -ratio.detach().clamp(max=5.0) * A * logprobs
        return (per_token * maskf).sum() / maskf.sum().clamp(min=1.0)
    return ((per_token * maskf).sum(-1) / lengths).mean()


def run_once(impl: str, loss_type: str, inputs) -> float:
    logprobs, old, advantages, mask = inputs
    logprobs = logprobs.detach().requires_grad_()
    start = time.perf_counter()
    if impl == "reference":
        loss = reference_loss(loss_type, logprobs, old, advantages, mask)
    else:
        loss, _ = policy_loss(logprobs, old, advantages, mask, loss_type, with_metrics=impl == "ours+metrics")
    loss.backward()
    return time.perf_counter() - start


def timings() -> dict:
    torch.set_num_threads(1)
    inputs = make_inputs()
    results = {}
    for loss_type in OBJECTIVES:
        samples = {"ours": [], "reference": []}
        for impl in samples:  # warm-up
            run_once(impl, loss_type, inputs)
        for repeat in range(REPEATS):
            # Alternate, and swap who goes first, so load changes hit both alike.
            for impl in ("ours", "reference") if repeat % 2 == 0 else ("reference", "ours"):
                samples[impl].append(run_once(impl, loss_type, inputs))
        # Metrics allocate far more; timed apart so they do not disturb the allocator state of the pair above.
        samples["ours+metrics"] = [run_once("ours+metrics", loss_type, inputs) for _ in range(REPEATS // 3 + 1)]
        results[loss_type] = {impl: statistics.median(times) for impl, times in samples.items()}
    return results


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_child(impl: str, loss_type: str) -> None:
    """Runs in a subprocess: prints the peak RSS increase (bytes) of one forward + backward."""
    torch.set_num_threads(1)
    inputs = make_inputs()
    run_once(impl, loss_type, inputs)  # warm-up: lazy initialisation must not count
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # Linux: reset the RSS high-water mark (VmHWM) to the current RSS
    rss_before = _status_kib("VmRSS")
    run_once(impl, loss_type, inputs)
    print(json.dumps({"delta": (_status_kib("VmHWM") - rss_before) * 1024}))


def peak_memory(impl: str, loss_type: str) -> float:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(
        [sys.executable, __file__, "--memory", impl, loss_type], capture_output=True, text=True, check=True, env=env
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["delta"] / 2**20


def main() -> None:
    torch.manual_seed(0)
    times = timings()
    print(f"policy_loss forward+backward, B={B}, T={T}, float32, CPU, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread, median of {REPEATS}")
    header = (f"{'objective':<10}{'ours ms':>10}{'ref ms':>10}{'ratio':>8}{'+metrics ms':>13}"
              f"{'ours MiB':>10}{'ref MiB':>10}")
    print(header)
    print("-" * len(header))
    for loss_type in OBJECTIVES:
        t = times[loss_type]
        mem_ours, mem_ref = peak_memory("ours", loss_type), peak_memory("reference", loss_type)
        print(f"{loss_type:<10}{t['ours'] * 1e3:>10.2f}{t['reference'] * 1e3:>10.2f}"
              f"{t['ours'] / t['reference']:>8.2f}{t['ours+metrics'] * 1e3:>13.2f}{mem_ours:>10.1f}{mem_ref:>10.1f}")
    print("ratio = ours / reference (goal <= 1.2). +metrics: ours with the diagnostics dict.")
    print("MiB: peak RSS increase of one forward+backward (no metrics) in a fresh subprocess; inputs are 1 MiB each.")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--memory":
        peak_memory_child(sys.argv[2], sys.argv[3])
    else:
        main()
