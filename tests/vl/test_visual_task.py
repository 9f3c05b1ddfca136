"""builtin:vl-digits: deterministic, disjoint splits, answers graded by the math reward."""

import io

from PIL import Image

from sapo.data import load_dataset_spec
from sapo.data.visual_task import CELL, visual_dataset, visual_reference_completion
from sapo.rewards import math_reward


def test_splits_are_disjoint_deterministic_and_big_enough():
    test = visual_dataset("test", 200, seed=0)
    train = visual_dataset("train", 300, seed=1)
    assert len({e.meta["expression"] for e in test}) == 200  # distinct held-out problems
    assert not {e.meta["expression"] for e in test} & {e.meta["expression"] for e in train}
    again = visual_dataset("test", 200, seed=0)
    assert [e.images for e in again] == [e.images for e in test]  # same drawings too


def test_image_shows_one_cell_per_character_and_reference_is_correct():
    examples = load_dataset_spec("builtin:vl-digits", split="train", n=20, seed=3)
    for e in examples:
        image = Image.open(io.BytesIO(e.images[0]))
        assert image.size == (CELL * len(e.meta["expression"]), CELL)
        assert e.prompt == "=\n"
    completions = [visual_reference_completion(e) for e in examples]
    assert math_reward([e.prompt for e in examples], completions, [e.answer for e in examples]) == [1.0] * 20
