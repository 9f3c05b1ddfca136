import time

from sapo.rewards.extract import extract_answer, find_boxed


def test_boxed_nested_braces():
    assert extract_answer(r"so $\boxed{\frac{1}{2}}$.") == r"\frac{1}{2}"
    assert extract_answer(r"\boxed{\left( 3, \frac{\pi}{2} \right)}") == r"\left( 3, \frac{\pi}{2} \right)"


def test_last_boxed_wins_and_fbox():
    assert extract_answer(r"first \boxed{1} then \boxed{2}") == "2"
    assert extract_answer(r"\boxed{1} and finally \fbox{7}") == "7"
    assert find_boxed(r"\boxed{1} x \fbox{2} \boxed{3}") == ["1", "2", "3"]


def test_boxed_space_form_and_escaped_braces():
    assert extract_answer(r"The answer is $\boxed 5$.") == "5"
    assert extract_answer(r"\boxed{\{1,2\}}") == r"\{1,2\}"


def test_unclosed_boxed_falls_back_to_earlier_one():
    assert extract_answer(r"\boxed{3} and then \boxed{4") == "3"
    assert extract_answer(r"\boxed{4") is None


def test_hash_and_answer_is():
    assert extract_answer("She makes 9 * 2 = $18.\n#### 18") == "18"
    assert extract_answer("#### 1,000\n") == "1,000"
    assert extract_answer("so the final answer is $42$.") == "42"
    assert extract_answer("The answer is 7.\nThe answer is: 8") == "8"
    # boxed beats ####, #### beats "the answer is"
    assert extract_answer("The answer is 1\n#### 2") == "2"
    assert extract_answer("#### 2 \\boxed{3}") == "3"


def test_no_answer():
    assert extract_answer("") is None
    assert extract_answer("I think it is about 5") is None
    assert extract_answer("####   \n") is None
    assert extract_answer(r"\boxed{}") is None
    assert extract_answer(None) is None


def test_huge_and_deeply_nested_inputs_are_bounded():
    cases = [
        "x" * 5_000_000 + r"\boxed{5}",
        r"\boxed{" * 200_000,  # never closed
        r"\boxed{" + "{" * 100_000 + "1" + "}" * 100_000 + "}",  # too long an answer -> None
        "the answer is " * 200_000,
        "#" * 1_000_000,
    ]
    for text in cases:
        start = time.perf_counter()
        extract_answer(text)
        assert time.perf_counter() - start < 2.0
    assert extract_answer(cases[0]) == "5"
    assert extract_answer(cases[2]) is None
