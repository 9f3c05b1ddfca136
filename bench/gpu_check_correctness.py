"""gpu_check section "correctness": the GPU paths against their references, on the device.

1. Triton kernels (token_logprobs with entropy, bias and temperature; the fused SAPO loss) in float32 and
   bfloat16 against the float64 torch path, at a shape that is no multiple of the tiles.
2. The fused log-prob + loss head (what training runs) against the plain path (full float64 logits,
   log_softmax, gather, objectives.policy_loss), bf16 inputs, the real Qwen vocabulary.
3. Lean decode (TorchEngine, lean path) against HF generate, greedy, float32, a dense Qwen3 and a Qwen3-MoE:
   tokens must be equal in every row up to the first position where HF's top-2 logit gap is below 1e-4
   (below that, float32 rounding differences between two correct forwards may pick either token).

Numbers are recorded with every check (max errors, positions compared), so a failure says by how much.
"""

from __future__ import annotations

import torch
from gpu_check_common import Profile, Recorder, Skip, build_causal_lm

GAP_TOL = 1e-4  # top-2 logit gap below which greedy decoding may legitimately differ


def run(profile: Profile, rec: Recorder) -> None:
    device = profile.device
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 here (the torch default, made explicit)
    torch.backends.cudnn.allow_tf32 = False
    triton_ok = _triton_available(device)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        name = str(dtype).removeprefix("torch.")
        for label, check in ((f"triton token_logprobs {name}", _check_token_logprobs),
                             (f"triton fused sapo loss {name}", _check_fused_loss)):
            if triton_ok is not True:
                rec.check(label, None, reason=triton_ok)
            else:
                _guarded(rec, label, check, rec, profile, dtype, tol, label, "triton", profile.triton_shape)
    # the head training uses (Triton on CUDA when it imports, else torch) at a realistic shape, bf16
    label = "fused head vs plain path bf16"
    _guarded(rec, label, _check_fused_loss, rec, profile, torch.bfloat16, 3e-2, label, "auto", profile.head_check_shape)
    for kind, config in (("qwen3", profile.lean_dense), ("qwen3_moe", profile.lean_moe)):
        label = f"lean decode vs HF generate fp32 greedy {kind}"
        _guarded(rec, label, _check_lean_decode, rec, profile, kind, config, label)


def _guarded(rec: Recorder, label: str, check, *args) -> None:
    """Run one check; an exception (out of memory included) fails that check only, the others still run."""
    try:
        check(*args)
    except Skip as skip:
        rec.check(label, None, reason=str(skip))
    except Exception as err:  # noqa: BLE001 - recorded as this check's failure
        rec.check(label, False, error=f"{type(err).__name__}: {err}"[:500])
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _triton_available(device: str) -> bool | str:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install triton)"
    if device == "cpu":
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            return "CPU run without TRITON_INTERPRET=1 set before triton was imported"
    return True


def _inputs(shape, dtype, device, seed=0):
    n, d, vocab = shape
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen).to(device, dtype)  # [N, d]
    weight = (torch.randn(vocab, d, generator=gen) / d**0.5 * 4).to(device, dtype)  # [V, d], logits std ~4
    labels = torch.randint(0, vocab, (n,), generator=gen).to(device)  # [N]
    bias = torch.randn(vocab, generator=gen).to(device)  # [V] float32
    return hidden, weight, labels, bias


def _rel_max_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|: one number per tensor, comparable across dtypes and shapes."""
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))


def _plain64(hidden, weight, labels, temperature, bias):
    h = hidden.double().requires_grad_(True)
    w = weight.double().requires_grad_(True)
    b = None if bias is None else bias.double().requires_grad_(True)
    logits = h @ w.T + (0 if b is None else b)  # [N, V] float64
    log_probs = torch.log_softmax(logits / temperature, -1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)  # [N]
    return log_probs.gather(1, labels[:, None]).squeeze(1), entropy, (h, w, b)


def _check_token_logprobs(rec, profile, dtype, tol, label, backend, shape):
    from sapo.ops import token_logprobs

    hidden, weight, labels, bias = _inputs(shape, dtype, profile.device)
    h, w, b = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
    logp, entropy = token_logprobs(h, w, labels, temperature=0.7, with_entropy=True, bias=b, chunk_size=128,
                                   backend=backend)
    gen = torch.Generator().manual_seed(1)
    g_logp, g_ent = (torch.randn(labels.shape[0], generator=gen).to(profile.device) for _ in range(2))
    (logp * g_logp + entropy * g_ent).sum().backward()
    ref_logp, ref_ent, (h64, w64, b64) = _plain64(hidden, weight, labels, 0.7, bias)
    (ref_logp * g_logp + ref_ent * g_ent).sum().backward()
    errors = dict(
        logp_max_abs=float((logp.detach().double() - ref_logp.detach()).abs().max()),
        entropy_max_abs=float((entropy.detach().double() - ref_ent.detach()).abs().max()),
        grad_hidden_rel=_rel_max_err(h.grad, h64.grad), grad_weight_rel=_rel_max_err(w.grad, w64.grad),
        grad_bias_rel=_rel_max_err(b.grad, b64.grad),
    )
    # log-probs come from float32 logits of the (bf16) input values: tight for both dtypes
    passed = errors["logp_max_abs"] < 1e-3 and errors["entropy_max_abs"] < 1e-3 and max(
        errors["grad_hidden_rel"], errors["grad_weight_rel"], errors["grad_bias_rel"]) < tol
    rec.check(label, passed, shape=list(shape), grad_tol=tol, **errors)


def _check_fused_loss(rec, profile, dtype, tol, label, backend, shape):
    from sapo.objectives import aggregation_weights, policy_loss, resolve
    from sapo.ops import fused_token_policy_loss
    from sapo.ops.logprobs import select_kernels

    n, _, _ = shape
    rows = 8
    cols = n // rows
    hidden, weight, labels, _ = _inputs(shape, dtype, profile.device, seed=2)
    hidden, labels = hidden[: rows * cols], labels[: rows * cols]
    gen = torch.Generator().manual_seed(3)
    mask = (torch.rand(rows, cols, generator=gen) > 0.2).to(profile.device)  # [B, T]
    advantages = torch.randn(rows, generator=gen).to(profile.device)  # [B]
    ref_logp, _, (h64, w64, _) = _plain64(hidden, weight, labels, 0.9, None)
    # old log-probs near the current ones: ratios spread around 1, both SAPO gates active
    old = (ref_logp.detach() + 0.3 * torch.randn(rows * cols, generator=gen, dtype=torch.float64).to(profile.device))
    old = old.float().view(rows, cols)
    ref_loss, _ = policy_loss(ref_logp.view(rows, cols), old, advantages, mask, "sapo", with_metrics=False)
    ref_loss.backward()
    spec = resolve("sapo")
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss, logp, _ = fused_token_policy_loss(
        h, w, labels, old.reshape(-1), advantages[:, None].expand(rows, cols).reshape(-1),
        aggregation_weights(mask, spec).reshape(-1), spec, temperature=0.9, backend=backend,
        chunk_size=128 if backend == "triton" else None,
    )
    loss.backward()
    errors = dict(
        loss=float(loss), loss_ref=float(ref_loss),
        loss_rel=abs(float(loss) - float(ref_loss)) / max(abs(float(ref_loss)), 1e-30),
        logp_max_abs=float((logp.double() - ref_logp.detach()).abs().max()),
        grad_hidden_rel=_rel_max_err(h.grad, h64.grad), grad_weight_rel=_rel_max_err(w.grad, w64.grad),
    )
    # a wrong kernel is off by O(1); float32 sums over d = 1024 by ~1e-5
    passed = (errors["loss_rel"] < 1e-3 and errors["logp_max_abs"] < 1e-3
              and max(errors["grad_hidden_rel"], errors["grad_weight_rel"]) < tol)
    kernels = select_kernels(torch.device(profile.device), backend).name
    rec.check(label, passed, shape=list(shape), kernels=kernels, grad_tol=tol, **errors)


def _check_lean_decode(rec, profile, kind, config, label):
    from sapo.rollout import SamplingParams, TorchEngine
    from sapo.rollout.base import left_pad

    if kind == "qwen3_moe":
        # the reference: HF's eager expert loop on CUDA (its grouped_mm default is a bf16 kernel there, and
        # generate swaps in batched_mm for decoding); grouped_mm on CPU, where eager is slow
        config = dict(config, experts_implementation="grouped_mm" if profile.device == "cpu" else "eager")
    try:
        model = build_causal_lm(kind, config, torch.float32, profile.device, seed=5)
    except TypeError as err:  # a config key this transformers does not know
        raise Skip(f"{kind} config: {err}") from err
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(6)
    lengths = torch.randint(4, 4 + 3 * profile.lean_new_tokens // 4, (profile.lean_batch,), generator=gen).tolist()
    prompts = [torch.randint(1, vocab, (n,), generator=gen).tolist() for n in lengths]
    eos = vocab - 1
    input_ids, attention_mask = left_pad(prompts, 0)  # [B, P]
    out = model.generate(  # under generate's own no_grad
        input_ids.to(profile.device), attention_mask=attention_mask.to(profile.device), do_sample=False,
        num_beams=1, max_new_tokens=profile.lean_new_tokens, eos_token_id=eos, pad_token_id=0,
        output_logits=True, return_dict_in_generate=True,
    )
    hf_tokens = out.sequences[:, input_ids.shape[1]:].tolist()  # [B, N'] (N' < N when every row stopped)
    top2 = torch.stack(out.logits, 1).float().topk(2, dim=-1).values  # [B, N', 2]
    gaps = (top2[..., 0] - top2[..., 1]).tolist()  # [B, N']
    engine = TorchEngine(model)
    lean = engine.generate(prompts, SamplingParams(max_new_tokens=profile.lean_new_tokens, eos_token_ids=(eos,),
                                                   pad_token_id=0, greedy=True))
    compared = tied_rows = 0
    mismatches = []
    for row, (hf_row, gap_row, lean_row) in enumerate(zip(hf_tokens, gaps, lean.completion_ids)):
        end = next((t + 1 for t, token in enumerate(hf_row) if token == eos), len(hf_row))
        hf_row = hf_row[:end]
        first_tie = next((t for t, gap in enumerate(gap_row[:end]) if gap < GAP_TOL), end)
        tied_rows += first_tie < end
        # up to the first near-tie both must agree, including where a row stops
        want, got = hf_row[:first_tie], lean_row[:first_tie]
        compared += first_tie
        if want != got or (first_tie == end and lean_row != hf_row):
            diverge = next((t for t, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
            mismatches.append(dict(row=row, position=diverge, gap=gap_row[diverge] if diverge < len(gap_row) else None))
    total = sum(len(r) for r in lean.completion_ids)
    # near-ties are rare on a random model; most tokens must be compared or the check proves nothing
    rec.check(label, engine.last_path == "lean" and not mismatches and compared >= total / 2, path=engine.last_path,
              tokens_compared=compared, tokens_total=total, rows_with_near_tie=tied_rows,
              mismatched_rows=len(mismatches), first_mismatches=mismatches[:3])
