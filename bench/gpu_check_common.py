"""Shared pieces of bench/gpu_check.py: the two profiles (GPU, CPU smoke), the section recorder, model builders.

A section is a function ``run(profile, rec)`` in one of the gpu_check_*.py modules. It runs in a forked child
process; everything it wants to keep goes through ``rec`` (a JSON file rewritten after every entry), so a
section killed at its timeout still leaves what it measured so far.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class Skip(Exception):
    """Raised by a section (or one check) that cannot run here; the message says why and what would fix it."""


# Qwen3 shapes from the published configs (random weights: the hub is unreachable on the GPU machine).
QWEN3_0_6B = dict(
    vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, tie_word_embeddings=True,
)
QWEN3_1_7B = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, tie_word_embeddings=True,
)
QWEN_VOCAB = 151936  # the Qwen tokenizer's 151,851 ids, padded as in the Qwen3 checkpoints


@dataclass(frozen=True)
class Profile:
    """Everything that differs between the GPU run and the CPU smoke run."""

    name: str  # "gpu" or "smoke"
    device: str  # "cuda" or "cpu"
    budget_s: float  # the whole run, from process start
    # section -> (cap seconds, least seconds worth starting it with); the order is the run order
    sections: dict[str, tuple[float, float]]
    # correctness: Triton kernels vs float64 torch, fused head vs plain path, lean decode vs HF generate
    triton_shape: tuple[int, int, int]  # N, d, V: none a multiple of the kernel tiles
    head_check_shape: tuple[int, int, int]  # fused head vs plain path, bf16, real vocabulary on GPU
    lean_dense: dict[str, Any]
    lean_moe: dict[str, Any]
    lean_batch: int
    lean_new_tokens: int
    # loss head timing: (N, d, V, variants) per shape
    head_shapes: list[tuple[int, int, int, tuple[str, ...]]]
    head_seq_len: int  # tokens per completion row (N = rows x seq_len)
    head_repeats: int
    head_dtype: str
    # rollout timing
    rollout_model: dict[str, Any]
    rollout_batch: int
    rollout_new_tokens: int
    rollout_repeats: int
    rollout_dtype: str
    # sapo train
    train_model: dict[str, Any]
    train_overrides: dict[str, Any] = field(default_factory=dict)


GPU = Profile(
    name="gpu", device="cuda", budget_s=285.0,
    sections={"env": (30, 2), "correctness": (75, 20), "loss_head": (60, 20), "rollout": (60, 25),
              "train": (120, 45), "rollout_compile": (120, 40)},
    triton_shape=(333, 200, 50_007),
    head_check_shape=(2048, 1024, 151_936),
    lean_dense=dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=8,
                    num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=4096,
                    tie_word_embeddings=True),
    lean_moe=dict(vocab_size=151936, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
                  num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=64, num_experts=16,
                  num_experts_per_tok=4, norm_topk_prob=True, max_position_embeddings=4096, tie_word_embeddings=False),
    lean_batch=16, lean_new_tokens=64,
    head_shapes=[(16_384, 2048, 151_936, ("floor", "trl", "fused", "chunked")),
                 (32_768, 4096, 151_936, ("floor", "trl", "fused"))],
    head_seq_len=128, head_repeats=3, head_dtype="bfloat16",
    rollout_model=QWEN3_0_6B, rollout_batch=64, rollout_new_tokens=256, rollout_repeats=2, rollout_dtype="bfloat16",
    train_model=QWEN3_1_7B,
    # 16 prompts x 8 completions of <= 128 tokens; 2 updates of 64 rows (~10k tokens each) per step. Two
    # mini-batches, so the behaviour pass runs and the updates take the fused log-prob + loss head.
    train_overrides=dict(max_steps=20, prompts_per_step=16, num_generations=8, max_completion_length=128,
                         num_minibatches=2, train_size=2000),
)

SMOKE = Profile(
    name="smoke", device="cpu", budget_s=240.0,
    sections={"env": (30, 2), "correctness": (90, 10), "loss_head": (40, 5), "rollout": (40, 5),
              "train": (90, 10), "rollout_compile": (20, 1)},
    triton_shape=(37, 24, 100),
    head_check_shape=(64, 32, 500),
    lean_dense=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=True),
    lean_moe=dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
                  norm_topk_prob=True, max_position_embeddings=256, tie_word_embeddings=False),
    lean_batch=4, lean_new_tokens=8,
    head_shapes=[(256, 64, 1000, ("floor", "trl", "fused", "chunked")), (512, 64, 2000, ("floor", "trl", "fused"))],
    head_seq_len=32, head_repeats=1, head_dtype="bfloat16",
    rollout_model=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                       tie_word_embeddings=True),
    rollout_batch=4, rollout_new_tokens=8, rollout_repeats=1, rollout_dtype="bfloat16",
    train_model=dict(vocab_size=QWEN_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                     tie_word_embeddings=True),
    train_overrides=dict(max_steps=2, prompts_per_step=2, num_generations=2, max_completion_length=8,
                         num_minibatches=2, train_size=32, threads=1),
)

PROFILES = {"gpu": GPU, "smoke": SMOKE}


class Recorder:
    """A section's results, rewritten to `path` (JSON) after every entry so a killed section keeps them."""

    def __init__(self, path: Path, section: str):
        self.path, self.section = Path(path), section
        self.data: dict[str, Any] = {"checks": {}, "result": {}}

    def put(self, key: str, value: Any) -> None:
        self.data["result"][key] = value
        self._write()

    def check(self, name: str, passed: bool | None, **details: Any) -> bool:
        """One pass/fail check (passed=None: skipped, details say why); prints one progress line."""
        self.data["checks"][name] = {"passed": passed, **details}
        self._write()
        word = {True: "pass", False: "FAIL", None: "skip"}[passed]
        shown = ", ".join(f"{k}={_short(v)}" for k, v in details.items())
        log(f"{self.section}: {name}: {word}" + (f" ({shown})" if shown else ""))
        return bool(passed)

    def finish(self, status: str, **extra: Any) -> None:
        self.data.update(status=status, **extra)
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, default=_jsonable))
        os.replace(tmp, self.path)  # the parent never reads half a file


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    return str(value)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


_START = time.monotonic()


def log(message: str) -> None:
    print(f"[gpu-check {time.monotonic() - _START:6.1f}s] {message}", flush=True)


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def build_causal_lm(kind: str, config_kwargs: dict, dtype, device: str, seed: int = 0):
    """A random Qwen3 ("qwen3") or Qwen3-MoE ("qwen3_moe") model built from a config, on `device` in `dtype`.

    Initialised directly on the device (a 1.7B model initialises in seconds on the GPU, minutes on a CPU).
    """
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    config_cls, model_cls = (Qwen3Config, Qwen3ForCausalLM) if kind == "qwen3" else (Qwen3MoeConfig, Qwen3MoeForCausalLM)
    config = config_cls(**config_kwargs)
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_cls(config)
    return model.to(dtype).eval()
