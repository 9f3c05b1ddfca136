import logging
import math
import time

import pytest

from sapo.rewards.format_reward import format_reward
from sapo.rewards.runner import RewardRunner, check_rewards, load_reward_function


def length_reward(prompts, completions, answers):
    return [float(len(c)) for c in completions]


def crashing_reward(prompts, completions, answers):
    raise ZeroDivisionError("boom")


def hanging_reward(prompts, completions, answers):
    time.sleep(30)
    return [1.0] * len(completions)


def test_load_builtin_module_file_and_callable(tmp_path):
    assert load_reward_function("format") is format_reward
    assert load_reward_function(length_reward) is length_reward
    assert load_reward_function("sapo.rewards.format_reward:format_reward") is format_reward
    path = tmp_path / "my_reward.py"
    path.write_text("def one(prompts, completions, answers):\n    return [1.0] * len(completions)\n")
    assert load_reward_function(f"{path}:one")([""], ["x"], ["y"]) == [1.0]


def test_load_errors_say_what_exists(tmp_path):
    with pytest.raises(ValueError, match="built-in name"):
        load_reward_function("nonsense")
    with pytest.raises(ValueError, match="cannot import module"):
        load_reward_function("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="callables there: .*format_reward"):
        load_reward_function("sapo.rewards.format_reward:missing")
    with pytest.raises(ValueError, match="does not exist"):
        load_reward_function(f"{tmp_path}/nope.py:f")


def test_weighted_sum_and_columns():
    runner = RewardRunner([length_reward, "format"], weights=[0.5, 2.0])
    out = runner(["p", "p"], ["ab", r"\boxed{1}"], ["1", "1"])
    assert out.columns == {"length_reward": [2.0, 9.0], "format": [0.0, 1.0]}
    assert out.total == [1.0, 6.5]
    assert out.metrics["reward/errors/format"] == 0.0
    assert out.metrics["reward/format/mean"] == 0.5


def test_crash_counts_and_warns_once(caplog):
    runner = RewardRunner([length_reward, crashing_reward])
    with caplog.at_level(logging.WARNING, logger="sapo.rewards.runner"):
        for _ in range(3):
            out = runner(["p"], ["abc"], ["1"])
    assert out.total == [3.0]
    assert out.columns["crashing_reward"] == [0.0]
    assert out.metrics["reward/errors/crashing_reward"] == 3.0
    warnings = [r for r in caplog.records if "crashing_reward" in r.getMessage()]
    assert len(warnings) == 1
    assert "ZeroDivisionError: boom" in warnings[0].getMessage()


def test_hang_times_out_and_stops_piling_up():
    runner = RewardRunner([hanging_reward, length_reward], timeout_s=0.2, max_hung_threads=2)
    start = time.perf_counter()
    for _ in range(4):
        out = runner(["p"], ["ab"], ["1"])
        assert out.total == [2.0]
    assert time.perf_counter() - start < 3  # calls 3 and 4 are skipped, not waited for
    assert out.metrics["reward/timeouts/hanging_reward"] == 4.0
    assert len(runner.entries[0].hung) == 2


@pytest.mark.parametrize("bad,message", [
    (None, "NoneType"),
    ("1.0", "str"),
    ([1.0], "1 values for 2"),
    ([1.0, "x"], "value 1 is str"),
    ([1.0, math.nan], "value 1 is nan"),
    ([1.0, math.inf], "finite"),
])
def test_bad_return_values(bad, message, caplog):
    with pytest.raises(ValueError, match=message):
        check_rewards(bad, 2)
    runner = RewardRunner([lambda p, c, a: bad])
    with caplog.at_level(logging.WARNING, logger="sapo.rewards.runner"):
        out = runner(["p", "p"], ["a", "b"], ["1", "1"])
    assert out.total == [0.0, 0.0]
    assert out.metrics["reward/errors/<lambda>"] == 1.0
    assert message.split()[0] in caplog.text


def test_numpy_and_int_returns_are_accepted():
    import numpy as np

    assert check_rewards(np.array([1, 0]), 2) == [1.0, 0.0]
    assert check_rewards((1, True), 2) == [1.0, 1.0]


def test_math_reward_metrics_are_reported():
    out = RewardRunner(["math"])(["p"], [r"\boxed{2}"], ["2"])
    assert out.total == [1.0]
    assert "math/fast_path" in out.metrics


def test_input_validation():
    with pytest.raises(ValueError, match="at least one"):
        RewardRunner([])
    with pytest.raises(ValueError, match="weights"):
        RewardRunner(["format"], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="one prompt and one answer"):
        RewardRunner(["format"])(["p"], ["a", "b"], ["1", "1"])
