"""The lean decode path on Qwen3 / Qwen3-MoE against HF generate and the HF-forward engine path."""

import copy

import pytest
import torch
from transformers import Qwen3ForCausalLM, Qwen3MoeForCausalLM

from sapo.models.routing import record_routing
from sapo.rollout import HFEngine, TorchEngine
from sapo.rollout.lean_decoder import lean_unsupported
from tests.rollout.conftest import (
    UNUSED_EOS,
    VOCAB,
    assert_greedy_lean_matches_references,
    assert_sampled_lean_matches_hf_forward,
    run,
    stopping_eos,
    tiny_qwen3,
    tiny_qwen3_moe,
    tiny_qwen3_vl,
)


def test_greedy_matches_hf_generate_and_the_hf_forward_path(model, prompts):
    lean = assert_greedy_lean_matches_references(model, prompts)
    lengths = sorted(len(c) for c in lean.completion_ids)
    assert lengths[0] < lengths[-1] and any(lean.truncated) and not all(lean.truncated)


@pytest.mark.parametrize("options", [{}, {"temperature": 0.7, "top_k": 20}, {"top_p": 0.9}])
def test_sampled_tokens_equal_the_hf_forward_path_with_the_same_seed(model, prompts, options):
    assert_sampled_lean_matches_hf_forward(model, prompts, options)


def test_weights_are_read_live_not_copied(prompts):
    model = tiny_qwen3_moe(seed=3)
    engine = TorchEngine(model)
    before = run(engine, prompts, UNUSED_EOS)
    with torch.no_grad():
        model.model.layers[0].mlp.experts.gate_up_proj.mul_(3.0)
        model.model.layers[1].self_attn.k_proj.weight.mul_(-2.0)
        model.lm_head.weight.add_(0.5 * torch.randn_like(model.lm_head.weight))
    after = run(engine, prompts, UNUSED_EOS)
    assert after.completion_ids != before.completion_ids
    assert after.completion_ids == run(HFEngine(model), prompts, UNUSED_EOS).completion_ids


@pytest.mark.parametrize("overrides", [
    {"norm_topk_prob": True},
    {"mlp_only_layers": [0]},
    {"tie_word_embeddings": True, "attention_bias": True},
])
def test_moe_config_variants_match_hf_generate(prompts, overrides):
    config = tiny_qwen3_moe().config
    config.update(overrides)
    torch.manual_seed(4)
    model = Qwen3MoeForCausalLM(config).float()
    if overrides.get("attention_bias"):
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.bias.normal_(0, 0.5)
                layer.self_attn.v_proj.bias.normal_(0, 0.5)
    engine = TorchEngine(model)
    assert run(engine, prompts, UNUSED_EOS).completion_ids == run(HFEngine(model), prompts, UNUSED_EOS).completion_ids
    assert engine.last_path == "lean"


BF16_PROBE = """
import copy, json, sys
import torch
sys.path.insert(0, sys.argv[1])
from tests.rollout.conftest import VOCAB, teacher_forced_logprobs, tiny_qwen3_moe
from sapo.rollout import SamplingParams, TorchEngine
g = torch.Generator().manual_seed(1)
prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in [3, 7, 5, 1, 6]]
model = copy.deepcopy(tiny_qwen3_moe()).to(torch.bfloat16)
engine = TorchEngine(model)
batch = engine.generate(prompts, SamplingParams(max_new_tokens=8, eos_token_ids=(5, 9), pad_token_id=0,
                                                generator=torch.Generator().manual_seed(0)))
trainer, sampler = teacher_forced_logprobs(model, batch, temperature=1.0)
exact, _ = teacher_forced_logprobs(copy.deepcopy(model).float(), batch, temperature=1.0)
print(json.dumps({"path": engine.last_path, "capability": torch.backends.cpu.get_cpu_capability(),
                  "tokens": [t for row in batch.completion_ids for t in row],
                  "sampler": sampler.tolist(), "trainer": trainer.tolist(), "fp32": exact.tolist()}))
"""


@pytest.mark.parametrize("kernels", ["default", "avx2"])
def test_bf16_sampler_and_trainer_differ_by_less_than_bf16_itself(kernels):
    """bf16 sampler log-probs against the trainer's teacher-forced bf16 log-probs of the same tokens.

    The two run different shapes (one token per row against a KV cache, and the whole sequence at
    once), so their bf16 roundings agree on some CPU kernel paths and not on others: ATen's scalar
    ("default") kernels give a gap of 0 here and its AVX2 kernels 0.027, on the same machine (docs/
    performance.md). Neither is wrong; what holds on every path is that the gap is smaller than the
    error bf16 itself makes against the float32 forward of the same weights (~0.19 here), while a
    misaligned or stale log-prob would be off by whole nats. Each kernel path runs in its own process
    (ATEN_CPU_CAPABILITY is read at start-up), so every machine tests both."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "ATEN_CPU_CAPABILITY": kernels, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", BF16_PROBE, str(Path(__file__).parents[2])], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["path"] == "lean"
    assert all(0 <= t < VOCAB for t in out["tokens"])
    sampler, trainer, exact = (torch.tensor(out[k]) for k in ("sampler", "trainer", "fp32"))
    assert torch.isfinite(sampler).all() and (sampler <= 0).all()
    gap = (sampler - trainer).abs().max()
    bf16_error = (trainer - exact).abs().max()
    assert gap <= bf16_error, (out["capability"], float(gap), float(bf16_error))


def test_routing_record_falls_back_to_the_hf_forward(prompts):
    model = tiny_qwen3_moe()
    engine = TorchEngine(model)
    with record_routing(model) as record:
        batch = run(engine, prompts, UNUSED_EOS, max_new_tokens=4)
    assert engine.last_path == "hf"
    assert record.experts.shape == (2, len(prompts), max(map(len, prompts)) + 3, 2)  # prompt + 3 decode inputs
    assert batch.completion_ids == run(engine, prompts, UNUSED_EOS, max_new_tokens=4).completion_ids
    assert engine.last_path == "lean"  # the hooks are gone after the context


def test_unsupported_models_and_options_fall_back(prompts):
    dense = tiny_qwen3()
    assert lean_unsupported(dense) is None
    assert "Qwen3VLForConditionalGeneration" in lean_unsupported(tiny_qwen3_vl())
    forced = TorchEngine(dense, lean=False)
    run(forced, prompts, UNUSED_EOS, max_new_tokens=2)
    assert forced.last_path == "hf"
    assert TorchEngine(dense, compile=True).lean is False
    config = dense.config
    config = copy.deepcopy(config)
    config.update({"use_sliding_window": True, "sliding_window": 4,
                   "layer_types": ["sliding_attention", "full_attention"]})
    windowed = Qwen3ForCausalLM(config)
    assert "sliding window 4" in lean_unsupported(windowed, total_len=20)
    engine = TorchEngine(windowed)
    assert run(engine, prompts, UNUSED_EOS).completion_ids == run(HFEngine(windowed), prompts, UNUSED_EOS).completion_ids
    assert engine.last_path == "hf"
    config.update({"sliding_window": 64})  # wider than prompt + completion: plain causal attention
    assert lean_unsupported(Qwen3ForCausalLM(config), total_len=19) is None
    assert "dtype torch.float64" in lean_unsupported(copy.deepcopy(dense).double())


def test_single_token_and_single_row(model):
    engine = TorchEngine(model)
    one = run(engine, [[4, 5, 6]], UNUSED_EOS, max_new_tokens=1)
    assert engine.last_path == "lean" and len(one.completion_ids[0]) == 1
    assert one.completion_ids == run(HFEngine(model), [[4, 5, 6]], UNUSED_EOS, max_new_tokens=1).completion_ids


def _fed_positions(batch, width):
    """[B, width] True where a token was fed to the model: real prompt tokens and every completion token
    but the last, in the left-padded layout of ``RolloutBatch.to_padded``."""
    prompt_len = max(len(p) for p in batch.prompt_ids)
    fed = torch.zeros(len(batch), width, dtype=torch.bool)
    for i, (prompt, completion) in enumerate(zip(batch.prompt_ids, batch.completion_ids)):
        fed[i, prompt_len - len(prompt) : prompt_len + len(completion) - 1] = True
    return fed


def test_recorded_experts_match_the_hf_path_and_a_teacher_forced_forward(prompts):
    model = tiny_qwen3_moe()
    eos = stopping_eos(model, prompts)
    lean_engine = TorchEngine(model)
    hf_engine = TorchEngine(model, lean=False)
    lean, old = run(lean_engine, prompts, eos, record_experts=True), run(hf_engine, prompts, eos, record_experts=True)
    assert lean_engine.last_path == "lean" and hf_engine.last_path == "hf"
    assert lean.completion_ids == old.completion_ids and not all(lean.truncated)
    width = max(map(len, prompts)) + 12 - 1
    assert lean.routing.shape == old.routing.shape == (2, len(prompts), width, 2)
    assert lean.routing.dtype == torch.int8
    assert run(lean_engine, prompts, eos).routing is None  # recorded only when asked for
    fed = _fed_positions(lean, width)
    assert torch.equal(lean.routing[:, fed], old.routing[:, fed])
    assert (lean.routing[:, ~fed] == -1).all()  # padding, finished rows, the last token
    packed = lean.to_padded(pad_id=0)
    with torch.no_grad(), record_routing(model) as full:
        model(input_ids=packed["input_ids"], attention_mask=packed["attention_mask"],
              position_ids=packed["position_ids"])
    assert full.experts.shape[2] == width + 1  # P + 12 columns; the last token is never fed to the sampler
    assert torch.equal(full.experts[:, :, :width][:, fed], lean.routing[:, fed])


def test_record_experts_needs_an_moe_model(prompts):
    with pytest.raises(ValueError, match="needs an MoE model"):
        run(TorchEngine(tiny_qwen3()), prompts, UNUSED_EOS, record_experts=True)


def test_lora_wrapped_models_fall_back(prompts):
    pytest.importorskip("peft")
    from sapo.models.lora import apply_lora

    wrapped = apply_lora(tiny_qwen3_moe(), 2, 4.0, target_modules=("q_proj", "v_proj"))
    assert "PeftModel" in lean_unsupported(wrapped)
    assert "not a plain nn.Linear" in lean_unsupported(wrapped.base_model.model)
    experts = apply_lora(tiny_qwen3_moe(), 2, 4.0, target_modules=[], target_parameters=["mlp.experts.gate_up_proj"])
    assert lean_unsupported(experts.base_model.model) is not None
    engine = TorchEngine(wrapped)
    run(engine, prompts, UNUSED_EOS, max_new_tokens=2)
    assert engine.last_path == "hf"
