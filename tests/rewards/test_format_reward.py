import pytest

from sapo.rewards.format_reward import format_reward, hash_format_reward


def test_boxed_format():
    completions = [r"so \boxed{5}", r"\boxed{5} or \boxed{6}", "5", r"\boxed{}", r"\boxed{5", r"\fbox{2}"]
    assert format_reward([""] * 6, completions, ["5"] * 6) == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]


def test_hash_format():
    completions = ["1+2=3 #### 3", "#### 3\nmore text", "#### 3 #### 4", "3", "####  ", "work\n#### 3\n"]
    expected = [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert format_reward([""] * 6, completions, ["3"] * 6, marker="####") == expected
    assert hash_format_reward([""] * 6, completions, ["3"] * 6) == expected


def test_chat_message_completion():
    assert format_reward([""], [[{"role": "assistant", "content": r"\boxed{1}"}]], ["1"]) == [1.0]


def test_unknown_marker():
    with pytest.raises(ValueError, match="boxed"):
        format_reward([""], ["x"], ["1"], marker="answer")
