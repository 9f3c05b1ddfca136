"""Tiny VL processor: token ids match the tiny config; save and load round-trip."""

import pytest
import torch

from sapo.data import Example
from sapo.data.multimodal import encode_multimodal
from sapo.models.loading import load_model, save_model
from sapo.models.vl import VISION_TOKENS, is_vision_language, load_processor, placeholder_token_ids
from sapo.rollout import SamplingParams, make_engine
from tests.vl.conftest import tiny_vl
from tests.vl.test_multimodal import _png


def test_tiny_processor_ids_are_the_model_reserved_ids(vl):
    model, processor = vl
    ids = processor.tokenizer.convert_tokens_to_ids(list(VISION_TOKENS))
    config = model.config
    assert ids == [config.vision_start_token_id, config.vision_end_token_id, config.image_token_id,
                   config.video_token_id]
    assert ids == list(range(len(processor.tokenizer) - 4, len(processor.tokenizer)))
    assert is_vision_language(model)
    assert placeholder_token_ids(model).tolist() == [config.image_token_id, config.video_token_id]


def test_saved_tiny_vl_loads_with_the_same_processor_and_generates(tmp_path):
    model, processor = tiny_vl("qwen3_vl_moe")
    save_model(model, processor.tokenizer, tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, tokenizer = load_model(str(tmp_path))
    again = load_processor(tmp_path, tokenizer, loaded)
    example = Example("=\n", "1", images=[_png(96, 64)])
    ids, visual = encode_multimodal(example, "=\n", processor)
    ids2, visual2 = encode_multimodal(example, "=\n", again)
    assert ids == ids2 and torch.equal(visual["pixel_values"], visual2["pixel_values"])
    batch = make_engine("torch", loaded).generate([ids2], SamplingParams(max_new_tokens=3, eos_token_ids=[2], pad_token_id=0, greedy=True), extra_inputs=[visual2])
    assert len(batch.completion_ids[0]) >= 1


def test_load_processor_needs_the_image_processor_file(tmp_path):
    model, processor = tiny_vl()
    save_model(model, processor.tokenizer, tmp_path)
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        load_processor(tmp_path)
