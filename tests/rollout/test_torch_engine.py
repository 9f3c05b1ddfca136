import pytest
import torch
from transformers import Qwen3ForCausalLM

from sapo.rollout import HFEngine, SamplingParams, TorchEngine, make_engine
from sapo.rollout.torch_engine import PreallocatedLayer, make_kv_cache
from tests.rollout.conftest import (
    VOCAB,
    assert_logprobs_close,
    image_prompt_rows,
    teacher_forced_logprobs,
    tiny_qwen3,
    tiny_qwen3_vl,
)

UNUSED_EOS = [VOCAB + 7]  # outside the vocabulary: never produced


def greedy(engine, prompts, eos, max_new_tokens=12):
    return engine.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens, eos_token_ids=eos, pad_token_id=0, greedy=True))


def test_greedy_matches_hf_generate_with_eos_stopping(model, prompts):
    free = greedy(TorchEngine(model), prompts, UNUSED_EOS)
    assert free.completion_ids == greedy(HFEngine(model), prompts, UNUSED_EOS).completion_ids
    assert all(len(c) == 12 for c in free.completion_ids) and all(free.truncated)
    eos = free.completion_ids[1][3]  # a token the model does emit: row 1 stops at step 4 (or earlier)
    ours, ref = greedy(TorchEngine(model), prompts, [eos]), greedy(HFEngine(model), prompts, [eos])
    assert ours.completion_ids == ref.completion_ids
    assert ours.truncated == ref.truncated
    assert len(ours.completion_ids[1]) <= 4 and ours.completion_ids[1][-1] == eos
    assert ours.truncated[1] is False and any(ours.truncated)  # some rows stopped early, some did not
    for row, truncated in zip(ours.completion_ids, ours.truncated):
        assert (eos not in row) == truncated and (eos not in row[:-1])
    assert_logprobs_close(ours.sampler_logprobs, ref.sampler_logprobs)


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_sampler_logprobs_equal_teacher_forced(model, prompts, cache):
    engine = TorchEngine(model, cache=cache, lean=False)  # the cache kinds are options of the HF-forward path
    batch = engine.generate(prompts, SamplingParams(max_new_tokens=10, temperature=0.7, eos_token_ids=[5, 17, 33], pad_token_id=0, generator=torch.Generator().manual_seed(0)))
    expected, got = teacher_forced_logprobs(model, batch, temperature=0.7)
    assert expected.numel() == batch.num_completion_tokens
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_static_and_dynamic_cache_agree(model, prompts):
    args = {"max_new_tokens": 10, "eos_token_ids": [5, 17, 33], "pad_token_id": 0, "top_k": 20}
    a = TorchEngine(model, cache="static", lean=False).generate(prompts, SamplingParams(generator=torch.Generator().manual_seed(1), **args))
    b = TorchEngine(model, cache="dynamic", lean=False).generate(prompts, SamplingParams(generator=torch.Generator().manual_seed(1), **args))
    assert a.completion_ids == b.completion_ids


def test_seeded_sampling_is_reproducible(model, prompts):
    engine = make_engine("torch", model)
    args = {"max_new_tokens": 10, "eos_token_ids": [5], "pad_token_id": 0, "top_p": 0.9}
    a = engine.generate(prompts, SamplingParams(generator=torch.Generator().manual_seed(3), **args))
    b = engine.generate(prompts, SamplingParams(generator=torch.Generator().manual_seed(3), **args))
    c = engine.generate(prompts, SamplingParams(generator=torch.Generator().manual_seed(4), **args))
    assert a == b and a.completion_ids != c.completion_ids


def test_first_token_frequencies_match_softmax(model):
    prompt, n, temperature = [3, 9, 27, 4], 3000, 1.5
    batch = TorchEngine(model).generate([prompt] * n, SamplingParams(max_new_tokens=1, temperature=temperature, eos_token_ids=UNUSED_EOS, pad_token_id=0, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([prompt])).logits[0, -1] / temperature, dim=-1).double()
    counts = torch.bincount(torch.tensor([c[0] for c in batch.completion_ids]), minlength=VOCAB).double()
    chi2 = ((counts - n * probs) ** 2 / (n * probs)).sum().item()
    assert chi2 < 130  # 63 degrees of freedom: mean 63, sd 11


def test_top_k_samples_stay_in_top_k(model, prompts):
    batch = TorchEngine(model).generate(prompts, SamplingParams(max_new_tokens=6, top_k=3, eos_token_ids=UNUSED_EOS, pad_token_id=0, generator=torch.Generator().manual_seed(0)))
    packed = batch.to_padded(pad_id=0)
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], attention_mask=packed["attention_mask"],
                       position_ids=packed["position_ids"]).logits[:, :-1]  # [B, T-1, V]
    top3 = logits.topk(3, dim=-1).indices  # [B, T-1, 3]
    in_top3 = (top3 == packed["input_ids"][:, 1:, None]).any(-1)
    assert in_top3[packed["completion_mask"][:, 1:].bool()].all()


def test_truncated_flags_and_lengths(model, prompts):
    batch = TorchEngine(model).generate(prompts, SamplingParams(max_new_tokens=3, eos_token_ids=UNUSED_EOS, pad_token_id=0, generator=torch.Generator().manual_seed(0)))
    assert batch.truncated == [True] * len(prompts)
    assert [len(c) for c in batch.completion_ids] == [3] * len(prompts)
    assert batch.prompt_ids == prompts


def test_restores_train_mode_and_builds_no_graph(model, prompts):
    model.train()
    batch = TorchEngine(model).generate(prompts, SamplingParams(max_new_tokens=2, eos_token_ids=[1], pad_token_id=0))
    assert model.training
    model.eval()
    assert isinstance(batch.sampler_logprobs[0][0], float)


def test_extra_inputs_on_text_model_point_to_hf_engine(model, prompts):
    with pytest.raises(NotImplementedError, match="make_engine\\('hf', model\\)"):
        TorchEngine(model).generate(prompts, SamplingParams(max_new_tokens=2, eos_token_ids=[1], pad_token_id=0), extra_inputs=[{'pixel_values': torch.zeros(1)}] * len(prompts))


def test_qwen3_vl_image_prompts_match_hf_and_teacher_forcing():
    model = tiny_qwen3_vl()
    prompts, extra_inputs, _ = image_prompt_rows()
    prompts, extra_inputs = prompts + [[12, 13, 14, 15, 16]], extra_inputs + [{}]
    args = {"max_new_tokens": 8, "eos_token_ids": UNUSED_EOS, "pad_token_id": 0, "greedy": True}
    eos = TorchEngine(model).generate(prompts, SamplingParams(**args), extra_inputs=extra_inputs).completion_ids[0][2]
    args["eos_token_ids"] = [eos]  # the image row stops by step 3: the batch shrinks mid-decode
    ours = TorchEngine(model).generate(prompts, SamplingParams(**args), extra_inputs=extra_inputs)
    ref = HFEngine(model).generate(prompts, SamplingParams(**args), extra_inputs=extra_inputs)
    assert ours.completion_ids == ref.completion_ids
    assert len(ours.completion_ids[0]) <= 3 and any(ours.truncated)
    sampled = TorchEngine(model).generate(prompts, SamplingParams(max_new_tokens=8, temperature=0.8, eos_token_ids=[eos], pad_token_id=0, generator=torch.Generator().manual_seed(0)), extra_inputs=extra_inputs)
    expected, got = teacher_forced_logprobs(model, sampled, 0.8, extra_inputs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_unknown_cache_kind():
    with pytest.raises(ValueError, match="cache must be 'static' or 'dynamic'"):
        TorchEngine(torch.nn.Linear(1, 1), cache="paged")


@pytest.mark.slow
def test_compiled_decode_matches_eager(prompts):
    model = tiny_qwen3()  # ~70 s to compile on the shared CPU
    eager = greedy(TorchEngine(model), prompts, UNUSED_EOS, max_new_tokens=6)
    compiled = greedy(TorchEngine(model, compile=True), prompts, UNUSED_EOS, max_new_tokens=6)
    assert compiled.completion_ids == eager.completion_ids


def test_sliding_window_model_falls_back_to_dynamic_cache(prompts):
    config = tiny_qwen3().config
    config.update({"use_sliding_window": True, "sliding_window": 4,
                   "layer_types": ["sliding_attention", "full_attention"]})
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    assert not any(isinstance(layer, PreallocatedLayer) for layer in make_kv_cache(model, 20, "static").layers)
    free = greedy(TorchEngine(model), prompts, UNUSED_EOS)
    eos = [free.completion_ids[2][4]]  # stops row 2 (at least) mid-decode
    ours, ref = greedy(TorchEngine(model), prompts, eos), greedy(HFEngine(model), prompts, eos)
    assert ours.completion_ids == ref.completion_ids and any(ours.truncated) and not all(ours.truncated)
