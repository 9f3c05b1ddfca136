import torch

from sapo.rollout import HFEngine, SamplingParams
from sapo.rollout.base import collate_extra_inputs
from tests.rollout.conftest import image_prompt_rows, teacher_forced_logprobs, tiny_qwen3_vl


def test_sampler_logprobs_equal_teacher_forced(model, prompts):
    batch = HFEngine(model).generate(prompts, SamplingParams(max_new_tokens=8, temperature=0.7, top_p=0.95, eos_token_ids=[5, 17, 33], pad_token_id=0, generator=torch.Generator().manual_seed(0)))
    expected, got = teacher_forced_logprobs(model, batch, temperature=0.7)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_seeded_sampling_is_reproducible_and_leaves_global_rng(model, prompts):
    args = {"max_new_tokens": 8, "eos_token_ids": [5], "pad_token_id": 0}
    engine = HFEngine(model)
    torch.manual_seed(123)
    a = engine.generate(prompts, SamplingParams(generator=torch.Generator().manual_seed(3), **args))
    after = torch.rand(1)
    b = engine.generate(prompts, SamplingParams(generator=torch.Generator().manual_seed(3), **args))
    c = engine.generate(prompts, SamplingParams(generator=torch.Generator().manual_seed(4), **args))
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(1))  # generate did not consume the global RNG
    assert a == b and a.completion_ids != c.completion_ids


def test_collate_extra_inputs_pads_token_aligned_and_concatenates_rest():
    rows = [{"mm_token_type_ids": [0, 1, 1], "image_grid_thw": torch.tensor([[1, 2, 2]])}, {}]
    out = collate_extra_inputs(rows, [3, 5], "cpu")
    assert out["mm_token_type_ids"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 0, 0]]
    assert out["image_grid_thw"].tolist() == [[1, 2, 2]]


def test_qwen3_vl_image_prompts():
    model = tiny_qwen3_vl()
    prompts, (image, _), pixels = image_prompt_rows()
    args = {"max_new_tokens": 6, "temperature": 0.8, "eos_token_ids": [1], "pad_token_id": 0}
    batch = HFEngine(model).generate(prompts, SamplingParams(generator=torch.Generator().manual_seed(0), **args), extra_inputs=[image, {}])
    assert [len(c) for c in batch.completion_ids] == [6, 6]

    expected, got = teacher_forced_logprobs(model, batch, 0.8, [image, {}])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)

    other_image = dict(image, pixel_values=pixels.flip(0))
    changed = HFEngine(model).generate(prompts, SamplingParams(generator=torch.Generator().manual_seed(0), **args), extra_inputs=[other_image, {}])
    assert changed.sampler_logprobs[0] != batch.sampler_logprobs[0]  # the image is seen
    assert changed.sampler_logprobs[1] == batch.sampler_logprobs[1]  # row 1 has no image
