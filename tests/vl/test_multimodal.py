"""Image rows -> prompt ids + visual inputs, image sources, and batch collation."""

import base64
import io
import json

import pytest
import torch
from PIL import Image

from sapo.data import Example, load_jsonl
from sapo.data.loaders import DataError
from sapo.data.multimodal import ImageError, collate_extra, encode_multimodal, image_bytes, load_image


def _png(width=64, height=32, color="white") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_image_tokens_follow_the_grid_and_token_types_mark_them(processor):
    example = Example(prompt="1+1=\n", answer="2", images=[_png(64, 32), _png(96, 64)], meta={"instruction": ""})
    ids, visual = encode_multimodal(example, "1+1=\n", processor)
    assert visual["image_grid_thw"].tolist() == [[1, 2, 4], [1, 4, 6]]  # 16-px patches
    image_id = processor.image_token_id
    assert sum(i == image_id for i in ids) == 2 + 6  # t*h*w / 2^2 per image
    assert visual["mm_token_type_ids"].tolist() == [int(i == image_id) for i in ids]
    assert visual["pixel_values"].shape == (8 + 24, 3 * 2 * 16 * 16)
    # both placeholders before the question, each framed by vision start/end
    text = processor.tokenizer.decode(ids)
    assert text == ("<|vision_start|>" + "<|image_pad|>" * 2 + "<|vision_end|>"
                    + "<|vision_start|>" + "<|image_pad|>" * 6 + "<|vision_end|>1+1=\n")


def test_image_markers_place_the_images(processor):
    example = Example(prompt="1<image>2", answer="3", images=[_png()])
    ids, _ = encode_multimodal(example, "1<image>2=\n", processor)
    assert processor.tokenizer.decode(ids) == "1<|vision_start|><|image_pad|><|image_pad|><|vision_end|>2=\n"
    with pytest.raises(ImageError, match="1 <image> markers but the row has 2 images"):
        encode_multimodal(Example("<image>", "1", images=[_png(), _png()]), "<image>", processor)


def test_pixel_values_are_recomputed_identically_after_eviction(processor):
    from sapo.data import multimodal

    _, visual = encode_multimodal(Example("=", "1", images=[_png(color="gray")]), "=", processor)
    first = visual["pixel_values"].clone()
    multimodal.PIXEL_CACHE.items.clear()
    multimodal.PIXEL_CACHE.bytes = 0
    assert torch.equal(visual["pixel_values"], first)


def test_image_sources(tmp_path):
    raw = _png(color="red")
    (tmp_path / "a.png").write_bytes(raw)
    encoded = base64.b64encode(raw).decode()
    for source in ("a.png", raw, encoded, "data:image/png;base64," + encoded, {"bytes": raw, "path": None},
                   {"path": "a.png"}, Image.open(io.BytesIO(raw))):
        assert load_image(source, base_dir=tmp_path).getpixel((0, 0)) == (255, 0, 0)
    assert image_bytes("a.png", tmp_path) == str((tmp_path / "a.png").resolve())
    with pytest.raises(ImageError, match="'missing.png' not found"):
        image_bytes("missing.png", tmp_path)
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(b"not an image")
    with pytest.raises(ImageError, match="got int"):
        image_bytes(3)


def test_collate_aligns_token_types_with_left_padded_prompts():
    rows = [
        {"pixel_values": torch.ones(4, 2), "image_grid_thw": torch.tensor([[1, 2, 2]]),
         "mm_token_type_ids": torch.tensor([0, 1, 0])},
        {},  # a text-only row
        {"pixel_values": torch.zeros(8, 2), "image_grid_thw": torch.tensor([[1, 2, 4]]),
         "mm_token_type_ids": torch.tensor([1, 1, 0, 0, 0])},
    ]
    out = collate_extra(rows, 8, prompt_width=5)  # prompts end at column 5, completions after
    assert out["mm_token_type_ids"].tolist() == [[0, 0, 0, 1, 0, 0, 0, 0], [0] * 8, [1, 1, 0, 0, 0, 0, 0, 0]]
    assert out["image_grid_thw"].tolist() == [[1, 2, 2], [1, 2, 4]]
    assert out["pixel_values"][:4].eq(1).all() and out["pixel_values"][4:].eq(0).all()
    right = collate_extra(rows, 6)  # right-padded: prompts start at column 0
    assert right["mm_token_type_ids"][0].tolist() == [0, 1, 0, 0, 0, 0]
    assert collate_extra([{}, None], 4, prompt_width=2) == {}
    with pytest.raises(ValueError, match="do not fit"):
        collate_extra(rows, 4, prompt_width=4)


def test_jsonl_bad_images_raise_with_line_or_skip_and_count(tmp_path):
    (tmp_path / "ok.png").write_bytes(_png())
    (tmp_path / "broken.png").write_bytes(b"garbage")
    rows = [{"prompt": "a", "answer": "1", "images": ["ok.png"]},
            {"prompt": "b", "answer": "2", "images": ["nope.png"]},
            {"prompt": "c", "answer": "3", "images": "broken.png"},
            {"prompt": "d", "answer": "4"}]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError, match=r"d\.jsonl: line 2: image 0: image file 'nope.png' not found"):
        load_jsonl(path, images_field="images")
    examples = load_jsonl(path, images_field="images", on_error="skip")
    assert [e.prompt for e in examples] == ["a", "d"]
    assert examples.skipped == {"bad_image": 2}
    assert examples[0].images == [str((tmp_path / "ok.png").resolve())] and examples[1].images == []


def test_text_model_with_image_rows_says_what_to_use():
    with pytest.raises(ValueError, match="no image processor"):
        encode_multimodal(Example("q", "1", images=[_png()]), "q", None)
