"""gpu_check sections "loss_head", "rollout" and "rollout_compile": timings against baselines measured in the same run.

loss_head: log-prob + SAPO loss, forward + backward, from hidden states [N, d] and the lm_head weight [V, d]:
  floor    the three lm_head-sized matmuls alone (z = h W^T, z W, z^T h), no softmax: the lower bound
  trl      TRL-style: full logits in the model dtype, log_softmax one completion row at a time (what TRL's
           selective_log_softmax does for bf16), gather, objectives.policy_loss, autograd backward
  fused    ours in training: sapo.ops.fused_token_policy_loss (Triton on CUDA, gradients in the forward)
  chunked  ours for sequence-level objectives: sapo.ops.token_logprobs + policy_loss (backward recomputes)
  Time: min over `head_repeats` steps after one warm-up (compiles the kernels), synchronised. Peak: CUDA
  max_memory_allocated during the first timed step minus what was allocated before it (the inputs), so it
  includes the returned [N, d] and [V, d] gradients.

rollout: a Qwen3-0.6B-shaped random model, 64 prompts (16-64 tokens) x 256 new tokens, bf16, temperature 1:
  hf_default   model.generate with its default (dynamic) cache, no log-probs kept
  ours         TorchEngine (the lean Qwen3 path, sampler log-probs included)
rollout_compile: the same model and prompts through model.generate(cache_implementation="static"), which
  transformers compiles (torch.compile, CUDA graphs) on CUDA; the first call (compile) is timed separately.
Tokens/s counts completion tokens actually returned (EOS included; one EOS id, rarely sampled).
"""

from __future__ import annotations

import time

import torch
from gpu_check_common import Profile, Recorder, Skip, build_causal_lm, log, sync

# ----------------------------------------------------------------------------------------------------------
# loss head


def _head_inputs(n, d, vocab, seq_len, dtype, device):
    gen = torch.Generator(device=device).manual_seed(0)  # drawn on the device: 600M values take seconds on a CPU
    rows = n // seq_len
    hidden = torch.randn(n, d, generator=gen, device=device).to(dtype).requires_grad_(True)  # [N, d]
    weight = (torch.randn(vocab, d, generator=gen, device=device) / d**0.5).to(dtype).requires_grad_(True)  # [V, d]
    labels = torch.randint(0, vocab, (n,), generator=gen, device=device)  # [N]
    old = -12.0 + torch.randn(rows, seq_len, generator=gen, device=device)  # [B, T] near log(1/V): ratios ~ 1
    advantages = torch.randn(rows, generator=gen, device=device)  # [B]
    mask = torch.ones(rows, seq_len, dtype=torch.bool, device=device)  # [B, T]
    return hidden, weight, labels, old, advantages, mask


def _head_step(variant, hidden, weight, labels, old, advantages, mask) -> float | None:
    """One forward + backward of `variant`; returns the loss (None for the floor)."""
    from sapo.objectives import aggregation_weights, policy_loss, resolve
    from sapo.ops import fused_token_policy_loss, token_logprobs

    rows, seq_len = mask.shape
    if variant == "floor":
        with torch.no_grad():
            logits = hidden @ weight.T  # [N, V]
            _ = logits @ weight  # [N, d]
            _ = logits.T @ hidden  # [V, d]
        return None
    if variant == "fused":
        spec = resolve("sapo")
        loss, _, _ = fused_token_policy_loss(
            hidden, weight, labels, old.reshape(-1), advantages[:, None].expand(rows, seq_len).reshape(-1),
            aggregation_weights(mask, spec).reshape(-1), spec,
        )
    else:
        if variant == "trl":
            logits = (hidden @ weight.T).view(rows, seq_len, -1)  # [B, T, V] in the model dtype
            per_row = [torch.log_softmax(row_logits, -1).gather(-1, row_labels[:, None]).squeeze(-1)
                       for row_logits, row_labels in zip(logits, labels.view(rows, seq_len))]
            logp = torch.stack(per_row).float()  # [B, T]
        elif variant == "chunked":
            logp = token_logprobs(hidden, weight, labels)[0].view(rows, seq_len)  # [B, T]
        else:
            raise ValueError(f"unknown loss-head variant {variant!r}")
        loss, _ = policy_loss(logp, old, advantages, mask, "sapo", with_metrics=False)
    loss.backward()
    return float(loss.detach())


def run_loss_head(profile: Profile, rec: Recorder) -> None:
    device = profile.device
    dtype = getattr(torch, profile.head_dtype)
    for index, (n, d, vocab, variants) in enumerate(profile.head_shapes, start=1):
        key = f"shape{index}"
        inputs = _head_inputs(n, d, vocab, profile.head_seq_len, dtype, device)
        hidden, weight = inputs[:2]
        input_bytes = sum(t.numel() * t.element_size() for t in inputs)
        results: dict = {"n": n, "d": d, "vocab": vocab, "dtype": profile.head_dtype, "input_mib": input_bytes / 2**20}
        rec.put(key, results)
        for variant in variants:
            try:  # one variant failing (out of memory, a kernel error) leaves the others measured
                results[variant] = _time_head(variant, inputs, profile)
            except Exception as err:  # noqa: BLE001
                results[variant] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]}
            hidden.grad = weight.grad = None
            if device == "cuda":
                torch.cuda.empty_cache()
            log(f"loss_head {key} N={n} d={d} V={vocab}: {variant} {_fmt_head(results[variant])}")
            rec.put(key, results)
        floor = results.get("floor", {}).get("seconds")
        for variant in variants:
            seconds = results.get(variant, {}).get("seconds")
            if floor and seconds and variant != "floor":
                results[variant]["x_floor"] = seconds / floor
        # sanity: the variants compute the same loss. fused and chunked both do float32 softmax math on the
        # same logits; the TRL-style path rounds its log-probs to bf16, so it is recorded, not judged.
        losses = {v: results[v]["loss"] for v in ("fused", "chunked", "trl") if "loss" in results.get(v, {})}
        for other in ("chunked", "trl"):
            if "fused" in losses and other in losses:
                results[f"fused_vs_{other}_loss_rel"] = abs(losses["fused"] - losses[other]) / max(abs(losses[other]), 1e-30)
        errors = {v: results[v]["error"] for v in variants if "error" in results[v]}
        rec.check(f"{key} every variant ran", not errors, **errors)
        if "fused_vs_chunked_loss_rel" in results:
            rec.check(f"{key} fused loss equals chunked loss", results["fused_vs_chunked_loss_rel"] < 1e-3,
                      loss_rel=results["fused_vs_chunked_loss_rel"])
        rec.put(key, results)
        del inputs, hidden, weight
        if device == "cuda":
            torch.cuda.empty_cache()


def _time_head(variant, inputs, profile) -> dict:
    device = profile.device
    hidden, weight = inputs[:2]
    _head_step(variant, *inputs)  # warm-up: Triton compile, cuBLAS handles
    times, peak, loss = [], None, None
    for repeat in range(profile.head_repeats):
        hidden.grad = weight.grad = None
        sync(device)
        if device == "cuda" and repeat == 0:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        loss = _head_step(variant, *inputs)
        sync(device)
        times.append(time.perf_counter() - start)
        if device == "cuda" and repeat == 0:
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    out = {"seconds": min(times), "seconds_all": times, "peak_gib_above_inputs": peak}
    if loss is not None:
        out["loss"] = loss
    return out


def _fmt_head(result: dict) -> str:
    if "error" in result:
        return result["error"]
    peak = result["peak_gib_above_inputs"]
    return f"{1000 * result['seconds']:.1f} ms" + (f", peak {peak:.2f} GiB" if peak is not None else "")


# ----------------------------------------------------------------------------------------------------------
# rollouts


def _rollout_setup(profile: Profile):
    model = build_causal_lm("qwen3", profile.rollout_model, getattr(torch, profile.rollout_dtype), profile.device)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(16, 65, (profile.rollout_batch,), generator=gen).tolist()  # prompts of 16..64 tokens
    prompts = [torch.randint(1, vocab - 1, (n,), generator=gen).tolist() for n in lengths]
    return model, prompts, vocab - 1  # one EOS id that the prompts never contain


def _hf_generate(model, prompts, eos, new_tokens, seed, **options) -> int:
    """Completion tokens returned by one sampled model.generate call (EOS included)."""
    from sapo.rollout.base import left_pad

    device = next(model.parameters()).device
    input_ids, attention_mask = left_pad(prompts, 0)  # [B, P]
    torch.manual_seed(seed)
    # generate runs under its own no_grad, as in HF's static cache + compile recipe (CUDA graphs included)
    sequences = model.generate(
        input_ids.to(device), attention_mask=attention_mask.to(device), do_sample=True, temperature=1.0,
        top_k=0, top_p=1.0, num_beams=1, max_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=0, **options,
    )
    new = sequences[:, input_ids.shape[1]:].tolist()  # [B, N]
    return sum(next((t + 1 for t, token in enumerate(row) if token == eos), len(row)) for row in new)


def _timed(fn, device, repeats) -> dict:
    speeds, tokens, seconds = [], [], []
    for repeat in range(repeats):
        sync(device)
        start = time.perf_counter()
        n_tokens = fn(repeat)
        sync(device)
        elapsed = time.perf_counter() - start
        seconds.append(elapsed)
        tokens.append(n_tokens)
        speeds.append(n_tokens / elapsed)
    best = max(range(repeats), key=lambda i: speeds[i])
    return {"tokens_per_s": speeds[best], "tokens": tokens[best], "seconds": seconds[best], "tokens_per_s_all": speeds}


def run_rollout(profile: Profile, rec: Recorder) -> None:
    from sapo.rollout import SamplingParams, TorchEngine

    device, new_tokens = profile.device, profile.rollout_new_tokens
    model, prompts, eos = _rollout_setup(profile)
    rec.put("setup", {"batch": len(prompts), "new_tokens": new_tokens, "dtype": profile.rollout_dtype,
                      "params_m": sum(p.numel() for p in model.parameters()) / 1e6})
    engine = TorchEngine(model)

    def ours(repeat: int, tokens: int = new_tokens) -> int:
        generator = torch.Generator(device=device).manual_seed(100 + repeat)
        batch = engine.generate(prompts, SamplingParams(max_new_tokens=tokens, temperature=1.0, eos_token_ids=(eos,),
                                                        pad_token_id=0, generator=generator))
        return batch.num_completion_tokens

    def hf(repeat: int, tokens: int = new_tokens) -> int:
        return _hf_generate(model, prompts, eos, tokens, seed=repeat)

    results = {}
    for name, fn in (("ours", ours), ("hf_default", hf)):
        try:  # one engine failing leaves the other measured
            fn(0, tokens=8)  # warm-up at a few tokens: cuBLAS handles, allocator, kernels
            results[name] = _timed(fn, device, profile.rollout_repeats)
        except Exception as err:  # noqa: BLE001
            results[name] = {"error": f"{type(err).__name__}: {err}"[:300]}
            rec.put(name, results[name])
            log(f"rollout {name}: {results[name]['error']}")
            continue
        if name == "ours":
            results[name]["path"] = engine.last_path
        rec.put(name, results[name])
        log(f"rollout {name}: {results[name]['tokens_per_s']:.0f} tokens/s")
    if "tokens_per_s" in results["ours"] and "tokens_per_s" in results["hf_default"]:
        rec.put("ours_x_hf_default", results["ours"]["tokens_per_s"] / results["hf_default"]["tokens_per_s"])
    rec.check("ours ran on the lean path", engine.last_path == "lean", path=engine.last_path)
    if "error" in results["ours"] or "error" in results["hf_default"]:
        raise RuntimeError(f"rollout failed: ours {results['ours'].get('error')}, hf {results['hf_default'].get('error')}")


def run_rollout_compile(profile: Profile, rec: Recorder) -> None:
    if profile.device != "cuda":
        raise Skip("static cache + torch.compile is measured on CUDA only (on CPU the compile alone takes minutes)")
    model, prompts, eos = _rollout_setup(profile)
    new_tokens = profile.rollout_new_tokens
    # the first call compiles the decode step (same batch and cache length as the timed calls: no recompile)
    start = time.perf_counter()
    _hf_generate(model, prompts, eos, new_tokens, seed=0, cache_implementation="static")
    sync(profile.device)
    rec.put("first_call_s", time.perf_counter() - start)
    rec.put("compiled", hasattr(model, "_compiled_call"))  # set by transformers when it auto-compiles
    log(f"rollout hf static+compile: first call {rec.data['result']['first_call_s']:.1f} s")
    result = _timed(lambda r: _hf_generate(model, prompts, eos, new_tokens, seed=r + 1, cache_implementation="static"),
                    profile.device, profile.rollout_repeats)
    rec.put("hf_static_compile", result)
    log(f"rollout hf static cache + compile: {result['tokens_per_s']:.0f} tokens/s")
