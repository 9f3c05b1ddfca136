"""The built-in visual task ``builtin:vl-digits``: read an arithmetic expression from an image, solve it.

The image shows a one-operation expression of the built-in arithmetic task (``sapo.data.builtin``,
operands 0..20, ``*`` by 0..9), one character per 32x32 cell (one image token of the tiny Qwen3-VL),
drawn with Pillow with a random offset, ink and paper shade per character. The text prompt is "=\\n";
the worked completion and the answer are the text task's:

    image:       "12+7"  (4 cells, 128x32 pixels)
    prompt:      "<image>=\\n"
    completion:  "12+7=19 #### 19"
    answer:      "19"

Splits: a problem is held out when the text task holds out the same expression ("12+7=\\n",
``heldout_split``), so the two built-in tasks share their split; the test split has distinct
expressions (218 exist), the train split samples i.i.d. with a fresh drawing each time.

``builtin:vl-digits-neg`` is where the VL demo has its coverage gap, the image counterpart of
``builtin:arith-neg``: the subtractions whose result is negative ("3-12", answer "-9"; 42 distinct
held-out problems). The warm start learns from a sloppy teacher who drops the minus sign in most of
those worked solutions (``warmstart_teacher_sign_error``); RL, trained on the whole task and rewarded by
the exact answer, is measured on these, where it has to learn the sign the demonstrations left out.
"""

from __future__ import annotations

import io
import random
from functools import lru_cache

from sapo.data.builtin import (
    BUILTIN_ALPHABET,
    ArithDifficulty,
    _expression,
    has_negative_step,
    sample_split,
    worked_steps,
)
from sapo.data.example import Example, ExampleList

VL_DIGITS = "builtin:vl-digits"
VL_DIGITS_NEG = "builtin:vl-digits-neg"
VL_TASKS = (VL_DIGITS, VL_DIGITS_NEG)  # the built-in tasks whose prompts are images
VL_ALPHABET = BUILTIN_ALPHABET  # text characters of prompts and completions
CELL = 32  # pixels per character cell = one image token (16-pixel patches, 2x2 merge)
JITTER = 1  # a character moves up to this many pixels from its cell centre


@lru_cache(maxsize=1)
def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=24)  # a scalable font where Pillow has FreeType
    except (TypeError, OSError):  # no FreeType: the small bitmap font
        return ImageFont.load_default()


def render_expression(expression: str, rng: random.Random) -> bytes:
    """A PNG of `expression`, one character per CELL x CELL cell, drawn with random offsets and shades."""
    from PIL import Image, ImageDraw

    paper = rng.randint(215, 255)
    image = Image.new("RGB", (CELL * len(expression), CELL), (paper, paper, paper))
    draw = ImageDraw.Draw(image)
    font = _font()
    for i, char in enumerate(expression):
        left, top, right, bottom = draw.textbbox((0, 0), char, font=font)
        x = i * CELL + (CELL - (right - left)) // 2 - left + rng.randint(-JITTER, JITTER)
        y = (CELL - (bottom - top)) // 2 - top + rng.randint(-JITTER, JITTER)
        ink = rng.randint(0, 80)
        draw.text((x, y), char, fill=(ink, ink, ink), font=font)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_visual_example(operands: list[int], operators: list[str], split: str, rng: random.Random,
                        task: str = VL_DIGITS) -> Example:
    expression = _expression(operands, operators)
    completion, answer = worked_steps(operands, operators)
    return Example(
        prompt="=\n", answer=str(answer), images=[render_expression(expression, rng)],
        meta={"task": task, "split": split, "expression": expression, "reference": completion,
              "sloppy_reference": worked_steps(operands, operators, drop_signs=True)[0],
              "negative_step": has_negative_step(operands, operators), "answer_format": "####", "instruction": ""},
    )


def visual_reference_completion(example: Example) -> str:
    """The worked completion for the supervised warm start, e.g. "12+7=19 #### 19"."""
    return example.meta["reference"]


def visual_dataset(split: str = "train", n: int = 1000, seed: int = 0, *, heldout_fraction: float = 0.2,
                   **difficulty) -> ExampleList:
    """``n`` image problems of one split, deterministic in (split, n, seed, difficulty).

    ``difficulty``: the fields of ``ArithDifficulty`` (default one operation, operands 0..20)."""
    d = ArithDifficulty(**{"min_ops": 1, "max_ops": 1, **difficulty})
    rng = random.Random(seed)
    return sample_split(
        split, n, rng, d, heldout_fraction, ExampleList(source=f"{VL_DIGITS}[{split}]"),
        lambda operands, operators: make_visual_example(operands, operators, split, rng),
        too_few=f"{VL_DIGITS} found only {{found}} distinct {split} problems of the {n} asked ({d}); ask for "
                "fewer (the default difficulty has 218 test problems)",
    )


def negative_visual_dataset(split: str = "train", n: int = 1000, seed: int = 0, *,
                            heldout_fraction: float = 0.2) -> ExampleList:
    """``builtin:vl-digits-neg``: ``n`` image subtractions with a negative result ("3-12"), deterministic in
    (split, n, seed); the split is builtin:vl-digits' (42 distinct test problems exist)."""
    rng = random.Random(seed + 2)
    return sample_split(
        split, n, rng, ArithDifficulty(min_ops=1, max_ops=1, operators="-"), heldout_fraction,
        ExampleList(source=f"{VL_DIGITS_NEG}[{split}]"),
        lambda operands, operators: make_visual_example(operands, operators, split, rng, task=VL_DIGITS_NEG),
        too_few=f"{VL_DIGITS_NEG} found only {{found}} distinct {split} problems of the {n} asked; its test split "
                "has 42 (set eval_num_problems to 42 or fewer)",
        keep=has_negative_step,
    )


def warmstart_inputs(processor, n: int, seed: int = 0, *,
                     teacher_sign_error: float = 0.0) -> tuple[list[list[int]], list[list[int]], list]:
    """(prompt ids, target ids ending in EOS, visual inputs) of n training problems, for a supervised warm
    start. teacher_sign_error: the share of worked solutions with a negative result that the sloppy teacher
    writes without their sign (builtin:vl-digits-neg's demonstrations; the text task's rule)."""
    from sapo.data.multimodal import encode_multimodal
    from sapo.data.templates import build_prompt

    tokenizer = processor.tokenizer
    sloppy = random.Random(seed + 2)
    prompt_ids, target_ids, extra = [], [], []
    for example in visual_dataset("train", n, seed):
        ids, visual = encode_multimodal(example, build_prompt(example, tokenizer), processor)
        prompt_ids.append(ids)
        extra.append(visual)
        completion = visual_reference_completion(example)
        if teacher_sign_error and example.meta["negative_step"] and sloppy.random() < teacher_sign_error:
            completion = example.meta["sloppy_reference"]
        target = tokenizer.encode(completion, add_special_tokens=False)
        target_ids.append(target + [tokenizer.eos_token_id])
    return prompt_ids, target_ids, extra


__all__ = ["CELL", "VL_ALPHABET", "VL_DIGITS", "VL_DIGITS_NEG", "VL_TASKS", "make_visual_example",
           "negative_visual_dataset", "render_expression", "visual_dataset", "visual_reference_completion",
           "warmstart_inputs"]
