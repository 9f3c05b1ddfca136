"""The lean decode path on Llama (SmolLM2-like), Qwen2 and Mistral against HF generate and the HF-forward
engine path; rope variants; tied embeddings; what it refuses. (Qwen3 / Qwen3-MoE: test_lean_qwen3.py.)"""

import pytest
import torch

from sapo.rollout import HFEngine, TorchEngine, lean_decoder
from sapo.rollout.lean_decoder import lean_unsupported
from tests.rollout.conftest import (
    UNUSED_EOS,
    assert_greedy_lean_matches_references,
    assert_logprobs_close,
    assert_sampled_lean_matches_hf_forward,
    run,
    stopping_eos,
    teacher_forced_logprobs,
    tiny_llama,
    tiny_mistral,
    tiny_qwen2,
    tiny_qwen3,
    tiny_qwen3_moe,
)

FAMILIES = {
    "llama": tiny_llama,  # tied embeddings, no biases
    "llama_biases": lambda: tiny_llama(seed=1, attention_bias=True, mlp_bias=True, tie_word_embeddings=False),
    "qwen2": tiny_qwen2,  # q/k/v biases
    "mistral": tiny_mistral,  # sliding window 4096, longer than any generation here
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def model(request):
    return FAMILIES[request.param]()


@pytest.fixture
def prompts():
    g = torch.Generator().manual_seed(2)
    return [torch.randint(1, 64, (n,), generator=g).tolist() for n in [3, 7, 5, 1, 6]]


def test_greedy_matches_hf_generate_and_the_hf_forward_path(model, prompts):
    assert lean_unsupported(model, total_len=40) is None
    lean = assert_greedy_lean_matches_references(model, prompts)
    assert len({len(c) for c in lean.completion_ids}) > 1  # rows left the batch at different steps


@pytest.mark.parametrize("options", [{"temperature": 0.7, "top_k": 20}, {"top_p": 0.9}])
def test_sampled_tokens_equal_the_hf_forward_path_and_teacher_forcing(model, prompts, options):
    assert_sampled_lean_matches_hf_forward(model, prompts, options)


LAYOUTS = {"unfused": (0, None), "packed": (None, 0), "unfused+packed": (0, 0)}  # FUSE_/PACK_ thresholds


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("build", [*FAMILIES.values(), tiny_qwen3, tiny_qwen3_moe], ids=[*FAMILIES, "qwen3", "qwen3_moe"])
def test_unfused_and_packed_projections_match_too(prompts, build, layout, monkeypatch):
    """Large layers (SmolLM2) run q/k/v and gate/up as separate matmuls, and on CPU in float32 through
    oneDNN-packed weights; the tiny models here are fused and unpacked unless the thresholds say otherwise."""
    fuse_max, pack_min = LAYOUTS[layout]
    if pack_min is not None:
        if lean_decoder.pack_batch_for(torch.float32, torch.device("cpu"), 1) is None:
            pytest.skip("this torch build has no oneDNN packed linear")
        monkeypatch.setattr(lean_decoder, "PACK_MIN_ELEMENTS", pack_min)
    if fuse_max is not None:
        monkeypatch.setattr(lean_decoder, "FUSE_MAX_ELEMENTS", fuse_max)
    model = build()
    net = lean_decoder.LeanDecoder(model, batch=1, max_len=4)
    projections = net.layers[0].qkv
    assert len(projections) == (3 if fuse_max == 0 else 1)
    assert all(p.packed == (pack_min is not None) for p in [*projections, net.layers[0].o, net.lm_head])
    if fuse_max == 0 and pack_min is None:
        assert projections[0].weight is model.model.layers[0].self_attn.q_proj.weight  # live, not copied
    eos = stopping_eos(model, prompts)
    lean = run(TorchEngine(model), prompts, eos, greedy=False, seed=3)
    old = run(TorchEngine(model, lean=False), prompts, eos, greedy=False, seed=3)
    assert lean.completion_ids == old.completion_ids
    assert_logprobs_close(lean.sampler_logprobs, old.sampler_logprobs)
    expected, got = teacher_forced_logprobs(model, lean, temperature=1.0)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert run(TorchEngine(model), prompts, eos).completion_ids == run(HFEngine(model), prompts, eos).completion_ids


def test_tied_embeddings_are_read_live(prompts):
    model = tiny_llama(seed=3)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    engine = TorchEngine(model)
    before = run(engine, prompts, UNUSED_EOS)
    with torch.no_grad():  # one tensor: both the input embedding and the LM head change
        model.model.embed_tokens.weight.add_(0.5 * torch.randn_like(model.model.embed_tokens.weight))
    after = run(engine, prompts, UNUSED_EOS)
    assert engine.last_path == "lean"
    assert after.completion_ids != before.completion_ids
    assert after.completion_ids == run(HFEngine(model), prompts, UNUSED_EOS).completion_ids


ROPE_VARIANTS = {
    # original 16 positions: the dimensions with wavelengths over 16 are slowed down by 8
    "llama3": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    # yarn also scales cos/sin (attention_factor != 1): checks that the table keeps the module's scaling
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16},
}


@pytest.mark.parametrize("variant", list(ROPE_VARIANTS))
def test_rope_scaling_variants_match_hf(prompts, variant):
    model = tiny_llama(seed=4, rope_parameters=ROPE_VARIANTS[variant])
    default = tiny_llama(seed=4)
    rotary = model.model.rotary_emb
    assert not torch.equal(rotary.inv_freq, default.model.rotary_emb.inv_freq) or rotary.attention_scaling != 1.0
    engine = TorchEngine(model)
    lean = run(engine, prompts, UNUSED_EOS, greedy=False, seed=1, max_new_tokens=24)  # positions up to 30
    assert engine.last_path == "lean"
    old = run(TorchEngine(model, lean=False), prompts, UNUSED_EOS, greedy=False, seed=1, max_new_tokens=24)
    assert lean.completion_ids == old.completion_ids
    expected, got = teacher_forced_logprobs(model, lean, temperature=1.0)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    greedy = run(engine, prompts, UNUSED_EOS, max_new_tokens=24)
    assert greedy.completion_ids == run(HFEngine(model), prompts, UNUSED_EOS, max_new_tokens=24).completion_ids
    assert greedy.completion_ids != run(TorchEngine(default), prompts, UNUSED_EOS, max_new_tokens=24).completion_ids


@pytest.mark.parametrize("rope", [{"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
                                  {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 4,
                                   "long_factor": [2.0] * 4, "original_max_position_embeddings": 16}])
def test_length_dependent_rope_types_fall_back(prompts, rope):
    model = tiny_llama(seed=5, rope_parameters=rope)
    assert f"rope_type {rope['rope_type']!r}" in lean_unsupported(model, total_len=20)
    engine = TorchEngine(model)
    assert run(engine, prompts, UNUSED_EOS).completion_ids == run(HFEngine(model), prompts, UNUSED_EOS).completion_ids
    assert engine.last_path == "hf"


def test_sliding_windows_shorter_than_the_generation_fall_back(prompts):
    mistral = tiny_mistral(sliding_window=4)
    assert "sliding window 4" in lean_unsupported(mistral, total_len=19)
    engine = TorchEngine(mistral)
    assert run(engine, prompts, UNUSED_EOS).completion_ids == run(HFEngine(mistral), prompts, UNUSED_EOS).completion_ids
    assert engine.last_path == "hf"
    # a window as long as prompt + completion is plain causal attention
    assert lean_unsupported(tiny_mistral(sliding_window=19), total_len=19) is None
    assert lean_unsupported(tiny_mistral(sliding_window=18), total_len=19) is not None
    assert lean_unsupported(tiny_mistral(sliding_window=None)) is None
    qwen2 = tiny_qwen2(use_sliding_window=True, sliding_window=4, max_window_layers=1)  # layer 1 slides
    assert "layer 1: sliding window 4" in lean_unsupported(qwen2, total_len=19)
    engine = TorchEngine(qwen2)
    assert run(engine, prompts, UNUSED_EOS).completion_ids == run(HFEngine(qwen2), prompts, UNUSED_EOS).completion_ids
    assert engine.last_path == "hf"


def test_what_the_lean_path_cannot_run_falls_back(prompts):
    model = tiny_llama(seed=6)
    assert lean_unsupported(model) is None
    handle = model.model.layers[1].mlp.register_forward_hook(lambda module, args, out: out * 2)
    assert "forward hooks" in lean_unsupported(model)
    engine = TorchEngine(model)
    hooked = run(engine, prompts, UNUSED_EOS, max_new_tokens=4)
    assert engine.last_path == "hf"
    assert hooked.completion_ids == run(HFEngine(model), prompts, UNUSED_EOS, max_new_tokens=4).completion_ids
    handle.remove()
    assert lean_unsupported(model) is None
    model.model.layers[0].self_attn.gate = torch.nn.Linear(32, 32)  # a module the lean path would skip
    assert "the lean path runs" in lean_unsupported(model)
    capped = tiny_llama(seed=6)
    capped.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping" in lean_unsupported(capped)
    assert "hidden_act" in lean_unsupported(tiny_llama(hidden_act="gelu"))
    partial = tiny_llama(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    assert "partial_rotary_factor" in lean_unsupported(partial)
