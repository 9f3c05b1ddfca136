import json
import threading
import time
from pathlib import Path

import pytest

from sapo.rewards.math_reward import MathReward, gold_answer_text, math_reward

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(scope="module")
def grader():
    reward = MathReward(num_workers=2, timeout_s=5.0)
    yield reward
    reward.close()


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        pytest.skip(f"{path} not found (benchmark data lives in ../shared/data)")
    return [json.loads(line) for line in path.open()]


EQUIVALENT = [
    (r"\frac{14}{3}", r"\dfrac{14}{3}"),
    (r"\frac{1}{2}", "0.5"),
    ("3/4", r"\frac{3}{4}"),
    (r"50\%", "50"),
    ("(1,2)", "(1, 2)"),
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\pi/2)"),
    (r"\{1,2\}", r"\{2,1\}"),
    ("[1,3)", "[1, 3)"),
    (r"(-\infty, 2]", r"(-\infty,2]"),
    (r"\text{Evelyn}", "Evelyn"),
    ("1000", "1,000"),
    ("18", r"\$18"),
    ("18", "18.0"),
    ("x^2+2x+1", "(x+1)^2"),
    (r"\sqrt{2}", "2^{1/2}"),
]
DIFFERENT = [("2", "3"), ("(1,2)", "(2,1)"), ("[1,3)", "[1,3]"), (r"\text{Evelyn}", "Bob"), (r"\frac{1}{2}", "0.4"),
             (r"\sqrt{2}", r"\sqrt{3}")]


@pytest.mark.parametrize("gold,pred", EQUIVALENT)
def test_equivalent(grader, gold, pred):
    assert grader([""], [rf"so $\boxed{{{pred}}}$"], [gold]) == [1.0]


@pytest.mark.parametrize("gold,pred", DIFFERENT)
def test_different(grader, gold, pred):
    assert grader([""], [rf"\boxed{{{pred}}}"], [gold]) == [0.0]


def test_no_answer_and_chat_completions(grader):
    assert grader(["", ""], ["no final answer here", [{"role": "assistant", "content": "#### 7"}]], ["7", "7"]) == [0.0, 1.0]


def test_gold_answer_text():
    assert gold_answer_text(27.0) == "27"
    assert gold_answer_text("Janet sells 9.\n#### 18") == "18"
    assert gold_answer_text(r"so \boxed{5}") == "5"


def test_length_mismatch_raises(grader):
    with pytest.raises(ValueError, match="one gold answer per completion"):
        grader([""], ["1", "2"], ["1"])


def test_pathological_answers_are_bounded():
    reward = MathReward(num_workers=1, timeout_s=1.0)
    try:
        deep = r"\boxed{" + r"\frac{" * 40 + "1" + "}{2}" * 40 + "}"
        start = time.perf_counter()
        # 9^9^9^9^9 really hangs sympy: the worker is killed after 1 s and the sample scores 0
        out = reward([""] * 3, [deep, r"\boxed{9^{9^{9^{9^{9}}}}}", r"\boxed{2}"], ["1", "1", "2"])
        assert out == [0.0, 0.0, 1.0]
        assert time.perf_counter() - start < 10
        metrics = reward.metrics()
        assert metrics["math/rejected"] == 1
        assert metrics["math/verify_timeouts"] == 1
    finally:
        reward.close()


def test_math_reward_works_from_a_thread():
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("r", math_reward([""] * 2, [r"\boxed{\sqrt{4}}", "#### 3"], ["2", "4"])))
    thread.start()
    thread.join(60)
    assert out["r"] == [1.0, 0.0]


def test_math500_sample_through_math_verify():
    rows = read_jsonl(DATA / "math500" / "test.jsonl")[:30]
    reward = MathReward(num_workers=2, use_fast_path=False)
    try:
        answers = [r["answer"] for r in rows]
        assert reward([""] * 30, [rf"\boxed{{{a}}}" for a in answers], answers) == [1.0] * 30
        assert reward.metrics()["math/math_verify"] > 0
    finally:
        reward.close()


def test_math500_all_reference_answers(grader):
    rows = read_jsonl(DATA / "math500" / "test.jsonl")
    answers = [r["answer"] for r in rows]
    assert len(rows) == 500
    assert grader([""] * 500, [rf"\boxed{{{a}}}" for a in answers], answers) == [1.0] * 500
    # the worked solutions end in \boxed{...}: extraction + equivalence must recover the answer
    assert grader([""] * 500, [r["solution"] for r in rows], answers) == [1.0] * 500
    # and a wrong answer is not accepted: shift answers by one row
    shifted = grader([""] * 500, [rf"\boxed{{{a}}}" for a in answers[1:] + answers[:1]], answers)
    assert sum(shifted) < 10


@pytest.mark.slow
def test_math500_all_through_math_verify():
    rows = read_jsonl(DATA / "math500" / "test.jsonl")
    reward = MathReward(num_workers=2, use_fast_path=False)
    try:
        answers = [r["answer"] for r in rows]
        assert reward([""] * 500, [rf"\boxed{{{a}}}" for a in answers], answers) == [1.0] * 500
    finally:
        reward.close()


def test_gsm8k_reference_solutions(grader):
    rows = read_jsonl(DATA / "gsm8k" / "test.jsonl")
    golds = [gold_answer_text(r["answer"]) for r in rows]
    assert grader([""] * len(rows), [r["answer"] for r in rows], golds) == [1.0] * len(rows)
    assert sum(grader([""] * len(rows), [r["answer"] for r in rows[1:] + rows[:1]], golds)) < 50
