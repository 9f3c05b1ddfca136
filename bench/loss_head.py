"""Benchmark: the loss head (lm_head -> token log-probs -> SAPO loss), forward + backward, four ways.

  plain    full logits h @ W^T, log_softmax, gather, objectives.policy_loss   (the baseline)
  chunked  sapo.ops.token_logprobs (chunked, backward recomputes logits) + policy_loss
  fused    sapo.ops.fused_token_policy_loss (gradients computed in the forward pass)
  floor    the three lm_head matmuls alone: z = h W^T, z W, z^T h (no softmax; holds full z)

Shapes: CPU N = 2,048 tokens, d = 512, V = 151,936, float32 (about 2 minutes on 2 cores);
        --device cuda: N = 16,384, d = 2,048, V = 151,936, bfloat16.
Each variant runs in its own subprocess. Memory, printed as "peak extra":
  cpu:  high-water RSS during one step (VmHWM, reset through /proc/self/clear_refs just before it) minus
        the RSS then, i.e. the extra resident memory the step needed at its peak, the [V, d] weight
        gradient included. glibc serves large tensors with mmap, so freed blocks leave RSS and the
        figure tracks live tensor bytes.
  cuda: torch.cuda.max_memory_allocated during one step minus the bytes allocated by the inputs.
Time: wall time of one step (cpu: min over --repeats runs; cuda: min over --repeats after a warm-up run,
synchronised). The CPU is shared, so figures move with the load; ratios come from the same run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sapo.objectives import aggregation_weights, policy_loss, resolve  # noqa: E402
from sapo.ops import fused_token_policy_loss, token_logprobs  # noqa: E402

VARIANTS = ("plain", "chunked", "fused", "floor")
SHAPES = {"cpu": dict(n=2048, d=512, vocab=151_936, dtype="float32"),
          "cuda": dict(n=16_384, d=2048, vocab=151_936, dtype="bfloat16")}
SEQ_LEN = 128  # tokens per completion row: N = B x SEQ_LEN


def make_inputs(args):
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    rows = args.n // SEQ_LEN
    hidden = torch.randn(args.n, args.d, generator=gen).to(device, dtype).requires_grad_(True)  # [N, d]
    weight = torch.randn(args.vocab, args.d, generator=gen).div_(args.d**0.5).to(device, dtype)  # [V, d]
    weight.requires_grad_(True)
    labels = torch.randint(0, args.vocab, (args.n,), generator=gen).to(device)  # [N]
    # old log-probs near log(1/V): ratios spread around 1 (their values do not change the cost)
    old_logprobs = (-12.0 + torch.randn(rows, SEQ_LEN, generator=gen)).to(device)  # [B, T]
    advantages = torch.randn(rows, generator=gen).to(device)  # [B]
    mask = torch.ones(rows, SEQ_LEN, dtype=torch.bool, device=device)  # [B, T]
    return hidden, weight, labels, old_logprobs, advantages, mask


def step(variant, inputs, args):
    hidden, weight, labels, old_logprobs, advantages, mask = inputs
    rows = mask.shape[0]
    if variant == "floor":
        with torch.no_grad():
            logits = hidden @ weight.T  # [N, V]
            _ = logits @ weight  # [N, d]
            _ = logits.T @ hidden  # [V, d]
        return
    if variant == "fused":
        spec = resolve("sapo")
        token_weights = aggregation_weights(mask, spec).reshape(-1)  # [N]
        token_advantages = advantages[:, None].expand(rows, SEQ_LEN).reshape(-1)  # [N]
        loss, _, _ = fused_token_policy_loss(
            hidden, weight, labels, old_logprobs.reshape(-1), token_advantages, token_weights, spec,
            chunk_size=args.chunk_size,
        )
    else:
        if variant == "plain":
            logits = hidden @ weight.T  # [N, V]
            logp = torch.log_softmax(logits.float(), -1).gather(1, labels[:, None]).squeeze(1)  # [N]
        else:
            logp, _ = token_logprobs(hidden, weight, labels, chunk_size=args.chunk_size)  # [N]
        loss, _ = policy_loss(logp.view(rows, SEQ_LEN), old_logprobs, advantages, mask, "sapo", with_metrics=False)
    loss.backward()


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def reset_peak_rss() -> int:
    """Reset the high-water RSS mark (Linux: clear_refs 5) and return the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return _status_kib("VmHWM") * 1024  # high-water RSS since the last reset


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def child(args) -> dict:
    torch.manual_seed(0)
    (torch.randn(64, 64) @ torch.randn(64, 64)).sum()  # load the BLAS before the baseline
    inputs = make_inputs(args)
    hidden, weight = inputs[:2]
    if args.device == "cuda":
        step(args.variant, inputs, args)  # warm-up: Triton compile, cuBLAS handles
        hidden.grad = weight.grad = None
        sync("cuda")
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = reset_peak_rss()
    times = []
    for _ in range(args.repeats):
        hidden.grad = weight.grad = None
        sync(args.device)
        start = time.perf_counter()
        step(args.variant, inputs, args)
        sync(args.device)
        times.append(time.perf_counter() - start)
        if len(times) == 1:  # memory of the first measured step
            peak = (torch.cuda.max_memory_allocated() if args.device == "cuda" else peak_rss_bytes()) - base
    return dict(variant=args.variant, seconds=min(times), peak_bytes=peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--n", type=int)
    parser.add_argument("--d", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"))
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per chunk (default: the ops' choice)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per variant (cpu 1, cuda 3)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # set in the subprocess
    args = parser.parse_args()
    for key, value in SHAPES[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.repeats is None:
        args.repeats = 3 if args.device == "cuda" else 1
    if args.n % SEQ_LEN:
        parser.error(f"--n must be a multiple of {SEQ_LEN} (tokens per row)")
    if args.variant:
        print(json.dumps(child(args)))
        return

    print(f"loss head fwd+bwd, device={args.device} N={args.n} d={args.d} V={args.vocab} {args.dtype}, "
          f"SAPO loss, chunk_size={args.chunk_size or 'default'}, repeats={args.repeats}")
    memory_what = ("high-water RSS during the step minus RSS before it" if args.device == "cpu"
                   else "torch.cuda.max_memory_allocated minus inputs")
    print(f"peak extra = {memory_what}; full fp32 logits would be {args.n * args.vocab * 4 / 2**20:,.0f} MiB")
    forwarded = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                 if k not in ("variants", "variant") and v is not None]
    results = {}
    for variant in args.variants.split(","):
        out = subprocess.run([sys.executable, __file__, f"--variant={variant}", *forwarded],
                             capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{variant}: failed\n{out.stderr[-2000:]}")
            continue
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    base = results.get("plain")
    print(f"{'variant':<9}{'time s':>9}{'x plain':>9}{'peak extra MiB':>16}{'x plain':>9}")
    for variant, r in results.items():
        t_ratio = f"{r['seconds'] / base['seconds']:.2f}" if base else "-"
        m_ratio = f"{r['peak_bytes'] / base['peak_bytes']:.3f}" if base else "-"
        print(f"{variant:<9}{r['seconds']:>9.2f}{t_ratio:>9}{r['peak_bytes'] / 2**20:>16,.0f}{m_ratio:>9}")
    if base:
        for variant in ("chunked", "fused"):
            if variant in results:
                r = results[variant]
                print(f"goal {variant}: memory <= 0.25 x plain: {r['peak_bytes'] <= 0.25 * base['peak_bytes']}, "
                      f"time <= 1.2 x plain: {r['seconds'] <= 1.2 * base['seconds']}")


if __name__ == "__main__":
    main()
