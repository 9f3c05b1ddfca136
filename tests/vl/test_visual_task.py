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


def test_negative_task_holds_every_held_out_negative_subtraction_and_says_how_many_exist():
    import pytest

    from sapo.data.visual_task import negative_visual_dataset

    test = load_dataset_spec("builtin:vl-digits-neg", split="test", n=42)
    expressions = [e.meta["expression"] for e in test]
    assert len(set(expressions)) == 42 and all("-" in x and "+" not in x and "*" not in x for x in expressions)
    assert all(int(e.answer) < 0 for e in test)  # the sign is what the sloppy teacher leaves out
    assert all(e.meta["sloppy_reference"].endswith(f"#### {-int(e.answer)}") for e in test)
    train = negative_visual_dataset("train", 300, seed=1)
    assert all(int(e.answer) < 0 for e in train)
    assert not set(expressions) & {e.meta["expression"] for e in train}
    assert not set(expressions) & {e.meta["expression"] for e in visual_dataset("train", 500, seed=0)}
    with pytest.raises(ValueError, match="eval_num_problems to 42 or fewer"):
        negative_visual_dataset("test", 43)


def test_the_vl_warm_start_takes_the_sloppy_teacher_on_negative_results_only(processor):
    from sapo.data.visual_task import warmstart_inputs

    tok = processor.tokenizer
    _, clean, _ = warmstart_inputs(processor, 600, seed=0)
    prompts, sloppy, _ = warmstart_inputs(processor, 600, seed=0, teacher_sign_error=0.6)
    examples = visual_dataset("train", 600, seed=0)
    negative = [i for i, e in enumerate(examples) if int(e.answer) < 0]
    changed = [i for i in range(600) if sloppy[i] != clean[i]]
    assert set(changed) <= set(negative) and len(negative) > 60
    assert 0.4 < len(changed) / len(negative) < 0.8  # about 0.6 of them (binomial, n > 60)
    for i in changed:
        text = tok.decode(sloppy[i], skip_special_tokens=True)
        assert "-" not in text.split("####")[1] and text == examples[i].meta["sloppy_reference"]
