"""Tiny random models built from a config (no hub) for the rollout tests."""

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from sapo.rollout.base import SamplingParams, collate_extra_inputs

VOCAB = 64
IMAGE = 120  # image token id of the tiny Qwen3-VL
UNUSED_EOS = [VOCAB + 7]  # outside the vocabulary: never produced


def tiny_qwen3(seed: int = 0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, initializer_range=0.2,
        tie_word_embeddings=False,
    )
    return Qwen3ForCausalLM(config).float()


def tiny_qwen3_moe(seed: int = 0) -> Qwen3MoeForCausalLM:
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=False,
        experts_implementation="grouped_mm",
    )
    return Qwen3MoeForCausalLM(config).float()


# The Llama-style families of the lean decode path, same shapes as tiny_qwen3 (head_dim 8, GQA 4 -> 2).
TINY_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                    initializer_range=0.2)


def _random_biases(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """HF initialises biases to zero, which would hide a bias the lean path forgot: draw them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=g) * 0.5)
    return model


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A SmolLM2-like Llama: tied embeddings, no biases (overrides: attention_bias, mlp_bias, rope_parameters...)."""
    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY_DECODER, "tie_word_embeddings": True, **overrides})
    return _random_biases(LlamaForCausalLM(config).float(), seed)


def tiny_qwen2(seed: int = 0, **overrides) -> Qwen2ForCausalLM:
    """Qwen2: q/k/v biases (drawn at random), no q/k norm, untied embeddings."""
    torch.manual_seed(seed)
    config = Qwen2Config(**{**TINY_DECODER, "tie_word_embeddings": False, **overrides})
    return _random_biases(Qwen2ForCausalLM(config).float(), seed)


def tiny_mistral(seed: int = 0, **overrides) -> MistralForCausalLM:
    """Mistral: no biases, untied embeddings, sliding window 4096 (longer than any test generation)."""
    torch.manual_seed(seed)
    config = MistralConfig(**{**TINY_DECODER, "tie_word_embeddings": False, **overrides})
    return MistralForCausalLM(config).float()


def run(engine, prompts, eos, greedy=True, seed=None, max_new_tokens=12, **options):
    """``engine.generate`` with pad id 0; ``seed`` seeds a fresh generator for sampling."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return engine.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens, eos_token_ids=eos, pad_token_id=0,
                                                   greedy=greedy, generator=generator, **options))


def assert_logprobs_close(a_rows, b_rows):
    """Per-row sampler log-probs of two engines agree to 1e-5."""
    for a, b in zip(a_rows, b_rows):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)


def assert_greedy_lean_matches_references(model, prompts):
    """Greedy decoding on the lean path gives the HF-forward path's and HF generate's tokens and stops, and
    the HF-forward path's log-probs; returns the lean batch for the caller's own checks."""
    from sapo.rollout import HFEngine, TorchEngine

    eos = stopping_eos(model, prompts)
    engine = TorchEngine(model)
    lean = run(engine, prompts, eos)
    assert engine.last_path == "lean"
    old, ref = run(TorchEngine(model, lean=False), prompts, eos), run(HFEngine(model), prompts, eos)
    assert lean.completion_ids == old.completion_ids == ref.completion_ids
    assert lean.truncated == old.truncated == ref.truncated
    assert_logprobs_close(lean.sampler_logprobs, old.sampler_logprobs)
    return lean


def assert_sampled_lean_matches_hf_forward(model, prompts, options):
    """Sampling with one seed: the lean path draws the HF-forward path's tokens, with its log-probs, which
    equal teacher forcing."""
    from sapo.rollout import TorchEngine

    eos = stopping_eos(model, prompts)
    lean = run(TorchEngine(model), prompts, eos, greedy=False, seed=5, **options)
    old = run(TorchEngine(model, lean=False), prompts, eos, greedy=False, seed=5, **options)
    assert lean.completion_ids == old.completion_ids and lean.truncated == old.truncated
    assert_logprobs_close(lean.sampler_logprobs, old.sampler_logprobs)
    expected, got = teacher_forced_logprobs(model, lean, temperature=options.get("temperature", 1.0))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def stopping_eos(model, prompts):
    """Two EOS ids the model emits mid-decode (greedy, HF forward), so rows stop at different steps."""
    from sapo.rollout import TorchEngine

    free = run(TorchEngine(model, lean=False), prompts, UNUSED_EOS)
    return [free.completion_ids[1][3], free.completion_ids[3][6]]


def teacher_forced_logprobs(model, batch, temperature, extra_inputs=None):
    """(expected, sampler) log-probs of the completion tokens; expected from one plain forward.

    With extra_inputs (Qwen3-VL), the model computes its own mrope positions from the attention mask and
    the image grids, as in training.
    """
    packed = batch.to_padded(pad_id=0)
    inputs = {"input_ids": packed["input_ids"], "attention_mask": packed["attention_mask"]}
    if extra_inputs is None:
        inputs["position_ids"] = packed["position_ids"]
    else:
        extra = collate_extra_inputs(extra_inputs, [len(p) for p in batch.prompt_ids], "cpu")
        completion_width = packed["input_ids"].shape[1] - extra["mm_token_type_ids"].shape[1]
        extra["mm_token_type_ids"] = F.pad(extra["mm_token_type_ids"], (0, completion_width))
        inputs.update(extra)
    with torch.no_grad():
        logits = model(**inputs).logits  # [B, T, V]
    logprobs = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    token_logprobs = logprobs.gather(-1, packed["input_ids"][:, 1:, None]).squeeze(-1)  # [B, T-1]
    mask = packed["completion_mask"][:, 1:].bool()
    return token_logprobs[mask], packed["sampler_logprobs"][:, 1:][mask]


@pytest.fixture(scope="module", params=["qwen3", "qwen3_moe"])
def model(request):
    return tiny_qwen3() if request.param == "qwen3" else tiny_qwen3_moe()


@pytest.fixture
def prompts():
    """Variable-length prompts (ids 1..VOCAB-1; 0 is the pad id)."""
    g = torch.Generator().manual_seed(1)
    lengths = [3, 7, 5, 1, 6]
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]


def tiny_qwen3_vl() -> Qwen3VLForConditionalGeneration:
    text = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                 "mrope_interleaved": True})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=16, deepstack_visual_indexes=[0])
    torch.manual_seed(0)
    config = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=121,
                           vision_start_token_id=122, vision_end_token_id=123, tie_word_embeddings=False)
    return Qwen3VLForConditionalGeneration(config).eval()


def image_prompt_rows():
    """A prompt with one 4-token image (16 patches, 2x2 merge) and a text-only prompt, with their extra inputs."""
    image_prompt = [5, 6, 122] + [IMAGE] * 4 + [123, 7, 8]
    pixels = torch.randn(16, 3 * 2 * 16 * 16, generator=torch.Generator().manual_seed(0))
    image = {"pixel_values": pixels, "image_grid_thw": torch.tensor([[1, 4, 4]]),
             "mm_token_type_ids": [int(t == IMAGE) for t in image_prompt]}
    return [image_prompt, [9, 10, 11]], [image, {}], pixels
