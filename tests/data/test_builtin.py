import pytest

from sapo.data.builtin import (
    BUILTIN_ALPHABET,
    builtin_dataset,
    parse_prompt,
    reference_completion,
    worked_steps,
)
from sapo.data.example import Example
from sapo.rewards.math_reward import MathReward


def test_worked_steps_golden():
    assert worked_steps([12, 7, 3], ["+", "*"]) == ("12+7=19 19*3=57 #### 57", 57)
    assert worked_steps([3, 7, 2], ["-", "*"]) == ("3-7=-4 -4*2=-8 #### -8", -8)
    assert reference_completion(Example("((12+7)*3)-4=\n", "53")) == "12+7=19 19*3=57 57-4=53 #### 53"


def test_prompt_answer_and_completion_agree():
    for example in builtin_dataset("train", 300, seed=1):
        expr = example.prompt[:-2]  # strip "=\n"
        assert eval(expr) == int(example.answer)  # parentheses make precedence match the steps
        completion = reference_completion(example)
        assert completion.endswith(f"#### {example.answer}")
        assert 12 <= len(completion) <= 40
        assert set(example.prompt + completion) <= set(BUILTIN_ALPHABET)
        assert example.meta["answer_format"] == "####"


def test_alphabet_is_small_and_unique():
    assert len(BUILTIN_ALPHABET) < 32
    assert len(set(BUILTIN_ALPHABET)) == len(BUILTIN_ALPHABET)


def test_deterministic_by_seed():
    a = [e.prompt for e in builtin_dataset("train", 50, seed=3)]
    assert a == [e.prompt for e in builtin_dataset("train", 50, seed=3)]
    assert a != [e.prompt for e in builtin_dataset("train", 50, seed=4)]


def test_splits_are_disjoint_and_test_is_distinct():
    train = {e.prompt for e in builtin_dataset("train", 3000, seed=0)}
    test = [e.prompt for e in builtin_dataset("test", 500, seed=0)]
    assert len(set(test)) == 500
    assert not train & set(test)
    # a different seed draws different problems but never crosses the split
    assert not train & {e.prompt for e in builtin_dataset("test", 500, seed=7)}


def test_difficulty_knobs():
    examples = builtin_dataset("train", 200, seed=0, min_ops=3, max_ops=3, operators="+", operand_max=5)
    for e in examples:
        operands, operators = parse_prompt(e.prompt)
        assert operators == ["+", "+", "+"]
        assert max(operands) <= 5
    with pytest.raises(ValueError, match="unknown difficulty knob"):
        builtin_dataset("train", 1, num_operations=2)
    with pytest.raises(ValueError, match="operators"):
        builtin_dataset("train", 1, operators="/")
    with pytest.raises(ValueError, match="split"):
        builtin_dataset("valid", 1)


def test_too_small_problem_space_fails_clearly():
    with pytest.raises(ValueError, match="distinct test problems"):
        builtin_dataset("test", 50, min_ops=1, max_ops=1, operand_max=2, operators="+")


def test_graded_exactly_by_the_fast_path():
    examples = builtin_dataset("test", 100, seed=0)
    reward = MathReward(num_workers=1)
    try:
        completions = [reference_completion(e) for e in examples]
        assert reward([e.prompt for e in examples], completions, [e.answer for e in examples]) == [1.0] * 100
        wrong = [c.rsplit(" ", 1)[0] + " " + str(int(e.answer) + 1) for c, e in zip(completions, examples)]
        assert reward([""] * 100, wrong, [e.answer for e in examples]) == [0.0] * 100
        assert reward.metrics()["math/fast_path"] == 200
        assert reward.metrics()["math/verify_calls"] == 0
    finally:
        reward.close()


def test_hard_task_has_three_operations_and_two_digit_answers_disjoint_from_its_train_split():
    from sapo.data.builtin import hard_dataset, parse_prompt, worked_steps
    from sapo.data.spec import load_dataset_spec

    test = hard_dataset("test", 100, seed=0)
    train = hard_dataset("train", 300, seed=0)
    for e in list(test) + list(train):
        operands, operators = parse_prompt(e.prompt)
        assert len(operators) == 3 and abs(int(e.answer)) >= 10
        assert worked_steps(operands, operators)[1] == int(e.answer)
    assert len({e.prompt for e in test}) == 100 and not {e.prompt for e in test} & {e.prompt for e in train}
    assert [e.prompt for e in load_dataset_spec("builtin:arith-hard", split="test", n=100)] == [e.prompt for e in test]


def test_warm_start_cache_key_ignores_an_unset_hard_fraction():
    from sapo.training.warmstart import WarmStartRecipe

    assert "hard_fraction" not in WarmStartRecipe().cache_fields()  # the caches built before it stay valid
    assert WarmStartRecipe(hard_fraction=0.1).cache_fields()["hard_fraction"] == 0.1


def test_the_coverage_gap_config_validates():
    from pathlib import Path

    from sapo.config import build_config

    cfg = build_config(Path(__file__).resolve().parents[2] / "configs" / "arith-hard.yaml")
    assert cfg.dataset == "builtin:arith-hard" and cfg.warmstart_hard_fraction == 0.1
    assert cfg.eval_temperatures == [0.3, 0.5, 0.7, 1.0]


def test_sloppy_teacher_drops_the_sign_and_carries_on():
    from sapo.data.builtin import has_negative_step, sloppy_steps, worked_steps

    assert sloppy_steps([3, 10, 2], ["-", "*"]) == ("3-10=7 7*2=14 #### 14", 14)
    assert worked_steps([3, 10, 2], ["-", "*"]) == ("3-10=-7 -7*2=-14 #### -14", -14)
    assert sloppy_steps([12, 7, 3], ["+", "*"]) == worked_steps([12, 7, 3], ["+", "*"])  # no negative: no error
    assert has_negative_step([3, 10, 20], ["-", "+"]) and not has_negative_step([12, 7], ["-"])


def test_negative_task_is_where_the_sloppy_teacher_is_wrong_with_two_digit_answers():
    from sapo.data.builtin import (
        has_negative_step,
        negative_dataset,
        parse_prompt,
        sloppy_steps,
        worked_steps,
    )
    from sapo.data.spec import load_dataset_spec

    test, train = negative_dataset("test", 100, seed=0), negative_dataset("train", 300, seed=0)
    for e in list(test) + list(train):
        problem = parse_prompt(e.prompt)
        assert has_negative_step(*problem) and abs(int(e.answer)) >= 10
        assert worked_steps(*problem)[1] == int(e.answer) != sloppy_steps(*problem)[1]
        assert e.meta["task"] == "builtin:arith-neg"
    assert len({e.prompt for e in test}) == 100 and not {e.prompt for e in test} & {e.prompt for e in train}
    assert [e.prompt for e in load_dataset_spec("builtin:arith-neg", split="test", n=100)] == [e.prompt for e in test]


def test_warm_start_with_a_sloppy_teacher_writes_sign_dropped_solutions_at_the_asked_share():
    from sapo.data.builtin import BUILTIN_ALPHABET, has_negative_step, parse_prompt
    from sapo.models.char_tokenizer import build_char_tokenizer
    from sapo.training.warmstart import WarmStartRecipe, builtin_sft_data

    tok = build_char_tokenizer(BUILTIN_ALPHABET)
    assert "teacher_sign_error" not in WarmStartRecipe().cache_fields()  # older caches stay valid
    recipe = WarmStartRecipe(train_size=4000, teacher_sign_error=0.6)
    prompts, targets, _ = builtin_sft_data(tok, recipe)
    clean_prompts, clean_targets, _ = builtin_sft_data(tok, WarmStartRecipe(train_size=4000))
    assert prompts == clean_prompts  # the same problems; only the worked solutions differ
    negative = [i for i, p in enumerate(prompts) if has_negative_step(*parse_prompt(tok.decode(p)))]
    wrong = [i for i in negative if targets[i] != clean_targets[i]]
    assert all(targets[i] == clean_targets[i] for i in range(len(prompts)) if i not in set(negative))
    assert len(negative) > 500 and 0.55 < len(wrong) / len(negative) < 0.65
    assert all("-" not in tok.decode(targets[i]).split("####")[1] for i in wrong)


def test_the_default_is_the_sloppy_teacher_task_and_the_easy_task_keeps_its_recipe():
    from pathlib import Path

    from sapo.config import build_config
    from sapo.training.warmstart import WarmStartRecipe

    default = build_config()
    assert default.dataset == "builtin:arith-neg" and default.warmstart_teacher_sign_error == 0.6
    assert WarmStartRecipe.from_config(default) == WarmStartRecipe(steps=1000, label_smoothing=0.0,
                                                                   teacher_sign_error=0.6)
    easy = build_config(Path(__file__).resolve().parents[2] / "configs" / "arith-easy.yaml")
    assert easy.dataset == "builtin:arith"
    assert WarmStartRecipe.from_config(easy) == WarmStartRecipe(steps=500, label_smoothing=0.05)  # the old cache key
