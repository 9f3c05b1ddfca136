import torch
from test_torch_engine import teacher_forced_logprobs
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from sapo.rollout import HFEngine
from sapo.rollout.hf_engine import collate_extra_inputs

IMAGE = 120


def test_sampler_logprobs_equal_teacher_forced(model, prompts):
    batch = HFEngine(model).generate(prompts, max_new_tokens=8, temperature=0.7, top_p=0.95,
                                     eos_token_ids=[5, 17, 33], pad_token_id=0,
                                     generator=torch.Generator().manual_seed(0))
    expected, got = teacher_forced_logprobs(model, batch, temperature=0.7)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_seeded_sampling_is_reproducible_and_leaves_global_rng(model, prompts):
    args = {"max_new_tokens": 8, "eos_token_ids": [5], "pad_token_id": 0}
    engine = HFEngine(model)
    torch.manual_seed(123)
    a = engine.generate(prompts, generator=torch.Generator().manual_seed(3), **args)
    after = torch.rand(1)
    b = engine.generate(prompts, generator=torch.Generator().manual_seed(3), **args)
    c = engine.generate(prompts, generator=torch.Generator().manual_seed(4), **args)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(1))  # generate did not consume the global RNG
    assert a == b and a.completion_ids != c.completion_ids


def test_collate_extra_inputs_pads_token_aligned_and_concatenates_rest():
    rows = [{"mm_token_type_ids": [0, 1, 1], "image_grid_thw": torch.tensor([[1, 2, 2]])}, {}]
    out = collate_extra_inputs(rows, [3, 5], "cpu")
    assert out["mm_token_type_ids"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 0, 0]]
    assert out["image_grid_thw"].tolist() == [[1, 2, 2]]


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


def test_qwen3_vl_image_prompts():
    model = tiny_qwen3_vl()
    image_prompt = [5, 6, 122] + [IMAGE] * 4 + [123, 7, 8]  # 16 patches, merge 2x2 -> 4 image tokens
    prompts = [image_prompt, [9, 10, 11]]
    pixels = torch.randn(16, 3 * 2 * 16 * 16, generator=torch.Generator().manual_seed(0))
    image = {"pixel_values": pixels, "image_grid_thw": torch.tensor([[1, 4, 4]]),
             "mm_token_type_ids": [int(t == IMAGE) for t in image_prompt]}
    args = {"max_new_tokens": 6, "temperature": 0.8, "eos_token_ids": [1], "pad_token_id": 0}
    batch = HFEngine(model).generate(prompts, extra_inputs=[image, {}],
                                     generator=torch.Generator().manual_seed(0), **args)
    assert [len(c) for c in batch.completion_ids] == [6, 6]

    packed = batch.to_padded(pad_id=0)
    width = packed["input_ids"].shape[1]
    extra = collate_extra_inputs([image, {}], [width - 6, 3], "cpu")  # prompt 10 tokens, all rows width 16
    type_ids = torch.zeros_like(packed["input_ids"])
    type_ids[:, : width - 6] = extra["mm_token_type_ids"]
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], attention_mask=packed["attention_mask"],
                       pixel_values=pixels, image_grid_thw=extra["image_grid_thw"], mm_token_type_ids=type_ids).logits
    logprobs = torch.log_softmax(logits[:, :-1] / 0.8, dim=-1).gather(-1, packed["input_ids"][:, 1:, None])[..., 0]
    mask = packed["completion_mask"][:, 1:].bool()
    torch.testing.assert_close(packed["sampler_logprobs"][:, 1:][mask], logprobs[mask], atol=1e-5, rtol=0)

    other_image = dict(image, pixel_values=pixels.flip(0))
    changed = HFEngine(model).generate(prompts, extra_inputs=[other_image, {}],
                                       generator=torch.Generator().manual_seed(0), **args)
    assert changed.sampler_logprobs[0] != batch.sampler_logprobs[0]  # the image is seen
    assert changed.sampler_logprobs[1] == batch.sampler_logprobs[1]  # row 1 has no image
