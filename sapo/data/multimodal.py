"""Image + text rows -> prompt ids and the model's visual inputs (Qwen3-VL), and their batching.

An image in `Example.images` may be a file path (relative paths are taken from the dataset file's
folder), raw bytes, a base64 string (with or without a `data:image/...;base64,` prefix), a
`{"bytes": ..., "path": ...}` dict (the Hugging Face datasets / Parquet image layout) or a PIL image.

Where the images go in the prompt: each `<image>` marker in the prompt text becomes one image
placeholder; without markers, the placeholders go right before the question, which is where the
Qwen3-VL chat template puts an image that comes first in the user turn. A placeholder is
`<|vision_start|><|image_pad|><|vision_end|>`, and the processor's image grid says how many
`<|image_pad|>` tokens each image becomes (grid t*h*w / merge^2).

Per-row inputs (`VisualInputs`): `image_grid_thw` [n_images, 3], `mm_token_type_ids` [prompt_len]
(1 on image tokens) and `pixel_values` [patches, C*T*p*p], the last computed from the stored image
bytes when first asked for and kept in a bounded cache: a real dataset's pixel values do not fit in
memory (~25 MB per megapixel image).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

IMAGE_MARKER = "<image>"
_DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,")


class ImageError(ValueError):
    """An image that cannot be used; the message names it and says why."""


def _describe(source: Any) -> str:
    if isinstance(source, str):
        return repr(source if len(source) < 80 else source[:40] + "...")
    return type(source).__name__


def _open(data: bytes | str):
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ImageError(f"not a readable image ({err})") from None
    return image.convert("RGB")


def image_bytes(source: Any, base_dir: str | os.PathLike | None = None) -> bytes | str:
    """The stored form of an image source: its absolute file path, or its encoded bytes.

    Raises ImageError for a missing file, bad base64 or an unsupported type (not for undecodable bytes:
    `check_image` decodes).
    """
    from PIL import Image

    if isinstance(source, Image.Image):
        buffer = io.BytesIO()
        source.save(buffer, format="PNG")
        return buffer.getvalue()
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    if isinstance(source, dict):
        if source.get("bytes"):
            return bytes(source["bytes"])
        if source.get("path"):
            return image_bytes(str(source["path"]), base_dir)
        raise ImageError("image dict has neither 'bytes' nor 'path'")
    if not isinstance(source, str) or not source.strip():
        raise ImageError(f"image must be a path, bytes, base64 text, a PIL image or a {{'bytes', 'path'}} dict; "
                         f"got {_describe(source)}")
    if _DATA_URL.match(source):
        source = _DATA_URL.sub("", source)
        try:
            return base64.b64decode(source, validate=True)
        except (binascii.Error, ValueError):
            raise ImageError("data URL with invalid base64") from None
    path = Path(source).expanduser()
    if not path.is_absolute() and base_dir is not None and (Path(base_dir) / path).is_file():
        path = Path(base_dir) / path
    if path.is_file():
        return str(path.resolve())
    if len(source) > 64 and "/" not in source[:8] and "." not in source[-5:]:  # looks like bare base64
        try:
            return base64.b64decode(source, validate=True)
        except (binascii.Error, ValueError):
            pass
    where = f" (also looked in {base_dir})" if base_dir is not None and not path.is_absolute() else ""
    raise ImageError(f"image file {str(path)!r} not found{where}")


def check_image(source: Any, base_dir: str | os.PathLike | None = None) -> bytes | str:
    """`image_bytes(source)` after checking that it decodes as an image (raises ImageError)."""
    stored = image_bytes(source, base_dir)
    _open(stored)
    return stored


def load_image(source: Any, base_dir: str | os.PathLike | None = None):
    """The image as an RGB PIL image."""
    return _open(image_bytes(source, base_dir))


# ---------------------------------------------------------------------------------------------
# Pixel values on demand, with a bounded cache


class _PixelCache:
    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.items: OrderedDict[int, torch.Tensor] = OrderedDict()

    def get(self, key: int) -> torch.Tensor | None:
        value = self.items.get(key)
        if value is not None:
            self.items.move_to_end(key)
        return value

    def put(self, key: int, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        self.items[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.items.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()


PIXEL_CACHE = _PixelCache(int(os.environ.get("SAPO_PIXEL_CACHE_MB", "1024")) * 2**20)


class VisualInputs(Mapping):
    """One prompt's visual model inputs; reads like a dict, `pixel_values` are made on first access."""

    def __init__(self, images: list[bytes | str], image_processor, image_grid_thw: torch.Tensor,
                 mm_token_type_ids: torch.Tensor, pixel_values: torch.Tensor | None = None):
        self.images = images  # stored sources (file paths or encoded bytes)
        self.image_processor = image_processor
        self.fixed = {"image_grid_thw": image_grid_thw, "mm_token_type_ids": mm_token_type_ids}
        self._key = id(self)
        if pixel_values is not None:
            PIXEL_CACHE.put(self._key, pixel_values)

    def __del__(self):
        entry = PIXEL_CACHE.items.pop(self._key, None)
        if entry is not None:
            PIXEL_CACHE.bytes -= entry.numel() * entry.element_size()

    def pixel_values(self) -> torch.Tensor:
        cached = PIXEL_CACHE.get(self._key)
        if cached is None:
            out = self.image_processor(images=[_open(s) for s in self.images], return_tensors="pt")
            cached = out["pixel_values"]
            if not torch.equal(out["image_grid_thw"], self.fixed["image_grid_thw"]):
                raise RuntimeError("image processor output changed since the prompt was encoded")
            PIXEL_CACHE.put(self._key, cached)
        return cached

    def __getitem__(self, key: str):
        if key == "pixel_values":
            return self.pixel_values()
        return self.fixed[key]

    def __iter__(self):
        return iter(("pixel_values", *self.fixed))

    def __len__(self) -> int:
        return 1 + len(self.fixed)


# ---------------------------------------------------------------------------------------------
# Encoding one row


def _with_placeholders(example, text: str, processor, n_images: int) -> str:
    placeholder = processor.vision_start_token + processor.image_token + processor.vision_end_token
    markers = text.count(IMAGE_MARKER)
    if markers:
        if markers != n_images:
            raise ImageError(f"the prompt has {markers} {IMAGE_MARKER} markers but the row has {n_images} images")
        return text.replace(IMAGE_MARKER, placeholder)
    if processor.image_token in text:
        raise ImageError(f"the prompt text already holds {processor.image_token!r}; mark image places with "
                         f"{IMAGE_MARKER} instead")
    question = example.prompt if isinstance(example.prompt, str) else next(
        (m["content"] for m in example.prompt if m.get("role") == "user" and isinstance(m.get("content"), str)), "")
    at = text.find(question) if question else -1
    at = at if at >= 0 else 0
    return text[:at] + placeholder * n_images + text[at:]


def encode_multimodal(example, text: str, processor) -> tuple[list[int], VisualInputs]:
    """(prompt ids, visual inputs) of an example with images; `text` is its rendered prompt.

    The prompt ids hold each image's run of image tokens; `mm_token_type_ids[j]` is 1 exactly where
    `prompt_ids[j]` is the image token. Raises ImageError for an unusable image.
    """
    if processor is None or getattr(processor, "image_processor", None) is None:
        raise ValueError("this dataset has images but the model has no image processor: use a vision-language "
                         "model (Qwen3-VL, builtin:vl-digits) whose folder has preprocessor_config.json")
    base_dir = Path(example.meta["source"]).parent if example.meta.get("source") else None
    stored = [image_bytes(source, base_dir) for source in example.images]
    images = [_open(s) for s in stored]
    out = processor.image_processor(images=images, return_tensors="pt")
    grid = out["image_grid_thw"]  # [n, 3]
    merge = processor.image_processor.merge_size
    pieces = _with_placeholders(example, text, processor, len(images)).split(processor.image_token)
    expanded = pieces[0]
    for thw, piece in zip(grid, pieces[1:]):
        expanded += processor.image_token * int(thw.prod() // merge**2) + piece
    ids = processor.tokenizer.encode(expanded, add_special_tokens=False)
    token_types = (torch.tensor(ids) == processor.image_token_id).long()  # [prompt_len]
    expected = int((grid.prod(dim=1) // merge**2).sum())
    if int(token_types.sum()) != expected:
        raise ImageError(f"the tokenizer split the image tokens: {int(token_types.sum())} image tokens for "
                         f"{expected} image features (is {processor.image_token!r} a special token?)")
    return ids, VisualInputs(stored, processor.image_processor, grid, token_types, out["pixel_values"])


# ---------------------------------------------------------------------------------------------
# Batching


def collate_extra(extra: Sequence[Mapping | None], width: int, *, prompt_width: int | None = None) -> dict:
    """Model inputs for a padded batch whose row i has the per-row visual inputs `extra[i]`.

    `width`: the batch's sequence length. `prompt_width`: prompts are LEFT-padded to this width (each
    row's prompt ends at that column: the rollout layout); None: each prompt starts at column 0
    (right-padded supervised batches). Returns {} when no row has images; otherwise `pixel_values` and
    `image_grid_thw` concatenated in row order (text-only rows contribute nothing) and
    `mm_token_type_ids` [B, width] with each row's ids at its prompt's columns, 0 elsewhere.
    """
    rows = [row if row else None for row in extra]
    if not any(row is not None and "image_grid_thw" in row for row in rows):
        return {}
    token_types = torch.zeros((len(rows), width), dtype=torch.long)  # [B, width]
    pixels, grids = [], []
    for i, row in enumerate(rows):
        if row is None:
            continue
        ids = torch.as_tensor(row["mm_token_type_ids"]).reshape(-1)
        start = 0 if prompt_width is None else prompt_width - ids.numel()
        if start < 0 or start + ids.numel() > width:
            raise ValueError(f"row {i}: {ids.numel()} prompt tokens do not fit the batch (width {width}, "
                             f"prompt_width {prompt_width})")
        token_types[i, start : start + ids.numel()] = ids
        pixels.append(torch.as_tensor(row["pixel_values"]))
        grids.append(torch.as_tensor(row["image_grid_thw"]))
    return {"pixel_values": torch.cat(pixels), "image_grid_thw": torch.cat(grids), "mm_token_type_ids": token_types}


__all__ = ["IMAGE_MARKER", "ImageError", "VisualInputs", "check_image", "collate_extra", "encode_multimodal",
           "image_bytes", "load_image"]
