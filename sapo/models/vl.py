"""Processors for vision-language policies (Qwen3-VL, Qwen3-VL-MoE): tiny ones built offline, real ones loaded.

A processor here is anything with the attributes `sapo.data.multimodal.encode_multimodal` reads:
`tokenizer`, `image_processor` (Qwen-VL style: returns `pixel_values` and `image_grid_thw`, has
`merge_size`), `image_token`, `image_token_id`, `vision_start_token`, `vision_end_token`. A transformers
`Qwen3VLProcessor` has them; `VisionProcessor` is the same thing without the video processor, which
transformers builds only with torchvision installed (it is not here).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Qwen-VL special tokens, in the order the tiny configs reserve the last four vocabulary ids
# (sapo.models.tiny: vision_start, vision_end, image, video).
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")

# The tiny vision tower (sapo.models.tiny): 16-pixel patches, 2x2 merge, 2 frames per temporal patch, so
# one image token covers 32x32 pixels. Images are resized to multiples of 32 with 1..64 tokens.
TINY_PATCH, TINY_MERGE, TINY_TEMPORAL = 16, 2, 2
TINY_MIN_PIXELS, TINY_MAX_PIXELS = 32 * 32, 64 * 32 * 32


@dataclass
class VisionProcessor:
    """A tokenizer and a Qwen-VL image processor, with the vision token strings."""

    tokenizer: Any
    image_processor: Any
    image_token: str = VISION_TOKENS[2]
    vision_start_token: str = VISION_TOKENS[0]
    vision_end_token: str = VISION_TOKENS[1]

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Writes preprocessor_config.json (the tokenizer is saved by sapo.models.save_model)."""
        self.image_processor.save_pretrained(folder)


def is_vision_language(model: nn.Module) -> bool:
    """True for models with a vision tower config (Qwen3-VL, Qwen3-VL-MoE, ...)."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    return getattr(getattr(base, "config", None), "vision_config", None) is not None


def placeholder_token_ids(model: nn.Module, device=None) -> torch.Tensor:
    """The ids the model replaces by image/video features wherever they appear in input_ids."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    ids = [getattr(base.config, key, None) for key in ("image_token_id", "video_token_id")]
    return torch.tensor([i for i in ids if i is not None], dtype=torch.long, device=device)


def _image_processor_class():
    # transformers >= 5.2x: the numpy/PIL backend is Qwen2VLImageProcessorPil; earlier 5.x call it
    # Qwen2VLImageProcessor (the torchvision one is *Fast there). Neither needs torchvision.
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil
    except ImportError:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

        return Qwen2VLImageProcessor


def add_vision_tokens(tokenizer) -> None:
    """Append the four Qwen-VL special tokens (ids len(tokenizer) .. len(tokenizer) + 3, in VISION_TOKENS
    order), so a tiny VL config built with vocab_size=len(tokenizer) afterwards reserves exactly these ids."""
    missing = [t for t in VISION_TOKENS if t not in tokenizer.get_vocab()]
    if missing and len(missing) != len(VISION_TOKENS):
        raise ValueError(f"tokenizer has some vision tokens but not {missing}; start from a text tokenizer")
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": list(VISION_TOKENS)})


def build_tiny_processor(tokenizer) -> VisionProcessor:
    """The processor for the tiny VL models: `tokenizer` (e.g. the char tokenizer; vision tokens are added
    in place) and a Qwen-VL image processor with the tiny patch/merge sizes, built from defaults (no hub)."""
    add_vision_tokens(tokenizer)
    image_processor = _image_processor_class()(
        patch_size=TINY_PATCH, merge_size=TINY_MERGE, temporal_patch_size=TINY_TEMPORAL,
        size={"shortest_edge": TINY_MIN_PIXELS, "longest_edge": TINY_MAX_PIXELS},
    )
    return VisionProcessor(tokenizer, image_processor)


# The built-in demo model (builtin:vl-digits): the tiny VL config with a wider text tower and vision tower
# (text hidden 128, 4 layers, head_dim 32 -> mrope_section sums to 16; vision hidden 64), ~1M parameters.
BUILTIN_VL_OVERRIDES: dict[str, Any] = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=4, head_dim=32,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
    vision_config={"hidden_size": 64, "intermediate_size": 128, "num_heads": 4, "out_hidden_size": 128},
)


def build_tiny_vl(arch: str, tokenizer, seed: int = 0, **overrides: Any) -> tuple[nn.Module, VisionProcessor]:
    """A fresh tiny `qwen3_vl` / `qwen3_vl_moe` model and its processor around `tokenizer` (vision tokens
    are added to it in place; the model's reserved ids are exactly those tokens)."""
    from sapo.models.tiny import build_tiny_model

    if arch not in ("qwen3_vl", "qwen3_vl_moe"):
        raise ValueError(f"arch must be 'qwen3_vl' or 'qwen3_vl_moe', got {arch!r}")
    processor = build_tiny_processor(tokenizer)
    model = build_tiny_model(arch, vocab_size=len(tokenizer), seed=seed, **overrides)
    assert model.config.image_token_id == processor.image_token_id
    return model, processor


def load_processor(folder: str | os.PathLike, tokenizer=None, model: nn.Module | None = None) -> VisionProcessor:
    """The processor of a local VL checkpoint folder (a real Qwen3-VL download or a saved tiny one).

    `tokenizer`: the already loaded tokenizer of that folder (loaded from it when None). With `model`, the
    image token id is checked against the model config, so a mismatched folder fails here and not as
    silently misplaced image features.
    """
    from transformers import AutoImageProcessor, AutoTokenizer

    folder = Path(folder)
    if not (folder / "preprocessor_config.json").is_file():
        raise FileNotFoundError(
            f"{folder} has no preprocessor_config.json: a vision-language model needs its image processor "
            "saved next to it (the checkpoint download has it; for your own model: processor.save_pretrained)"
        )
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    if not getattr(tokenizer, "chat_template", None):
        # Qwen3-VL checkpoints keep the chat template with the processor
        for name in ("chat_template.jinja", "chat_template.json"):
            if (folder / name).is_file():
                text = (folder / name).read_text()
                if name.endswith(".json"):
                    import json

                    text = json.loads(text)["chat_template"]
                tokenizer.chat_template = text
                break
    processor = VisionProcessor(
        tokenizer, AutoImageProcessor.from_pretrained(folder),
        image_token=getattr(tokenizer, "image_token", None) or VISION_TOKENS[2],
        vision_start_token=getattr(tokenizer, "vision_start_token", None) or VISION_TOKENS[0],
        vision_end_token=getattr(tokenizer, "vision_end_token", None) or VISION_TOKENS[1],
    )
    vocab = tokenizer.get_vocab()
    for token in (processor.image_token, processor.vision_start_token, processor.vision_end_token):
        if token not in vocab:
            raise ValueError(f"the tokenizer in {folder} has no {token!r} token; it is not a Qwen-VL tokenizer")
    if model is not None:
        base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
        expected = getattr(base.config, "image_token_id", None)
        if expected is not None and expected != processor.image_token_id:
            raise ValueError(f"{folder}: the tokenizer's {processor.image_token!r} is id {processor.image_token_id} "
                             f"but the model's image_token_id is {expected}; tokenizer and model do not match")
    return processor


__all__ = ["BUILTIN_VL_OVERRIDES", "VISION_TOKENS", "VisionProcessor", "add_vision_tokens", "build_tiny_processor",
           "build_tiny_vl", "is_vision_language", "load_processor",
           "placeholder_token_ids"]
