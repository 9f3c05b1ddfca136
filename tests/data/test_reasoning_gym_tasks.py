import pytest

from sapo.data.example import heldout_split
from sapo.data.reasoning_gym_tasks import load_reasoning_gym

pytest.importorskip("reasoning_gym")


def test_chain_sum_examples_with_answers():
    examples = load_reasoning_gym("chain_sum", n=20, seed=0)
    assert len(examples) == 20
    for e in examples:
        expression = e.meta["metadata"]["expression"]
        assert int(e.answer) == eval(expression)
        assert expression in e.prompt


def test_deterministic_by_seed():
    first = [e.prompt for e in load_reasoning_gym("chain_sum", n=10, seed=1)]
    assert first == [e.prompt for e in load_reasoning_gym("chain_sum", n=10, seed=1)]
    assert first != [e.prompt for e in load_reasoning_gym("chain_sum", n=10, seed=2)]


def test_splits_are_disjoint():
    train = load_reasoning_gym("basic_arithmetic", n=100, seed=0, split="train")
    test = load_reasoning_gym("basic_arithmetic", n=30, seed=0, split="test")
    assert len(train) == 100 and len(test) == 30
    assert all(heldout_split(e.prompt) == "test" for e in test)
    assert not {e.prompt for e in train} & {e.prompt for e in test}


def test_unknown_task_lists_available():
    with pytest.raises(ValueError, match="available: .*chain_sum"):
        load_reasoning_gym("no_such_task")
