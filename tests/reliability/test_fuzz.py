"""Property-based fuzzing (hypothesis) of everything that parses user input: the config override
parser, the JSONL loader, answer extraction and the math reward. Each must return or raise only
its documented error, in bounded time.
"""

from __future__ import annotations

import dataclasses
import time
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sapo.config import ConfigError, TrainConfig, build_config, parse_overrides
from sapo.data.loaders import DataError, load_jsonl
from sapo.rewards.extract import MAX_ANSWER_CHARS, extract_answer
from sapo.rewards.format_reward import format_reward
from sapo.rewards.math_reward import MathReward
from sapo.rewards.normalize import fast_compare, normalize_answer, parse_number

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# `rewards` is left out: its values are imported as modules, which random text must not do
KEYS = sorted(f.name for f in dataclasses.fields(TrainConfig) if f.name != "rewards")
SPECIAL = st.sampled_from(["[", "]", "[1,", "{a: 1}", "nan", "inf", "-1", "0", "1e400", "true", "null", "~",
                           ",,", "[[1]]", "!!python/object:os.system", "&a", "*a", "1_000", "0x10", ""])
VALUES = st.one_of(st.text(max_size=30), SPECIAL, st.integers().map(str), st.floats().map(str))


@FAST
@given(st.lists(st.tuples(st.one_of(st.sampled_from(KEYS), st.text(max_size=12)), VALUES), max_size=4))
def test_config_overrides_only_raise_config_error(pairs):
    items = [f"{k}={v}" for k, v in pairs]
    try:
        cfg = build_config(None, parse_overrides(items))
    except ConfigError as err:
        assert str(err)
        return
    cfg.validate()  # what was accepted is valid, and stays valid
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        assert value == value, f"{f.name} is NaN"  # noqa: PLR0124


@FAST
@given(st.lists(st.text(max_size=10), max_size=3))
def test_override_items_without_equals_are_config_errors(items):
    items = [i for i in items if "=" not in i]
    if items:
        with pytest.raises(ConfigError, match="expected key=value"):
            parse_overrides(items)


JSON_ROWS = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["q", "a", "x"]), inner, max_size=3),
    max_leaves=8,
)
LINES = st.one_of(
    JSON_ROWS.map(lambda v: __import__("json").dumps(v)),
    st.text(max_size=40).filter(lambda s: "\n" not in s and "\r" not in s),
    st.sampled_from(["", "   ", "{", '{"q": "1+1=", "a": 2}', '{"q": "x", "a": [1]}', "\ufeff{}", "\x00"]),
)


@FAST
@given(st.lists(LINES, max_size=6), st.sampled_from(["raise", "skip"]))
def test_jsonl_loader_only_raises_data_error(tmp_path_factory, lines, on_error):
    path = tmp_path_factory.mktemp("fuzz") / "data.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            examples = load_jsonl(path, "q", "a", on_error=on_error)
        except DataError as err:
            assert str(path) in str(err)
            return
    assert len(examples) >= 1
    for ex in examples:
        assert isinstance(ex.answer, str) and ex.answer.strip()
        assert ex.meta["line"] >= 1


def test_jsonl_loader_invalid_utf8_is_a_data_error(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"q": "1+1=", "a": 2}\n\xff\xfe{}\n')
    with pytest.raises(DataError, match="line 2"):
        load_jsonl(path, "q", "a")


def test_jsonl_loader_deep_nesting_is_a_data_error(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"q": "1+1=", "a": 2}\n' + "[" * 100_000 + "\n")
    with pytest.raises(DataError, match="line 2"):
        load_jsonl(path, "q", "a")


MATHY = st.text(alphabet=st.sampled_from(list("0123456789+-*/^.,{}()[]\\ boxedfrac#answeris$=\n")), max_size=200)
TEXT = st.one_of(st.text(max_size=200), MATHY)


@FAST
@given(TEXT)
def test_extract_answer_never_raises(text):
    answer = extract_answer(text)
    assert answer is None or (isinstance(answer, str) and 0 < len(answer) <= MAX_ANSWER_CHARS)
    normalize_answer(text)
    parse_number(text)


@FAST
@given(TEXT, TEXT)
def test_fast_compare_and_format_reward_never_raise(gold, pred):
    assert fast_compare(gold, pred) in (True, False, None)
    assert format_reward([""], [pred], [gold]) in ([0.0], [1.0])


@pytest.fixture(scope="module")
def grader():
    reward = MathReward(num_workers=1, timeout_s=2.0)
    yield reward
    reward.close()


BOXED = st.one_of(MATHY.map(lambda s: f"so \\boxed{{{s}}}"), MATHY.map(lambda s: f"#### {s}"), TEXT)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(st.lists(BOXED, min_size=1, max_size=3), MATHY)
def test_math_reward_is_zero_or_one_in_bounded_time(grader, completions, gold):
    t0 = time.perf_counter()
    rewards = grader([""] * len(completions), completions, [gold] * len(completions))
    assert all(r in (0.0, 1.0) for r in rewards) and len(rewards) == len(completions)
    assert time.perf_counter() - t0 < 30  # a 2 s timeout per math-verify call (a restart at worst), never a hang


def test_math_reward_fuzz_reaches_math_verify(grader):
    # the property above would be weak if every input stopped at extraction or the fast path
    assert grader([""], ["so \\boxed{\\frac{1}{2}}"], ["0.5"]) == [1.0]
    assert grader.counters["math_verify"] >= 1
