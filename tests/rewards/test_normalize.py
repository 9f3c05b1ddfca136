from fractions import Fraction

from sapo.rewards.normalize import fast_compare, normalize_answer, parse_number


def test_normalize_strips_formatting():
    assert normalize_answer(r"\text{Evelyn}") == "Evelyn"
    assert normalize_answer(r"\left( 3, \dfrac{\pi}{2} \right)") == r"(3,\frac{\pi}{2})"
    assert normalize_answer(r"\$18.") == "18"
    assert normalize_answer(r"90^\circ") == "90"


def test_parse_number():
    assert parse_number("1,000") == 1000
    assert parse_number("$18") == 18
    assert parse_number("18.0") == 18
    assert parse_number("-3/4") == Fraction(-3, 4)
    assert parse_number(r"-\frac{3}{4}") == Fraction(-3, 4)
    assert parse_number(r"\dfrac{14}{3}") == Fraction(14, 3)
    assert parse_number(r"\frac12") == Fraction(1, 2)
    assert parse_number(r"50\%") == 50
    assert parse_number(".5") == Fraction(1, 2)
    assert parse_number("1/0") is None
    assert parse_number("1,2") is None  # a list, not a number
    assert parse_number("x") is None
    assert parse_number(r"\sqrt{2}") is None


def test_fast_compare_decides_only_when_sure():
    assert fast_compare("1000", "1,000") is True
    assert fast_compare("18", r"\$18") is True
    assert fast_compare("18", "18.0") is True
    assert fast_compare(r"\frac{1}{2}", "0.5") is True
    assert fast_compare(r"\text{Evelyn}", "Evelyn") is True
    assert fast_compare("18", "17") is False
    assert fast_compare(r"\sqrt{2}", r"2^{1/2}") is None
    assert fast_compare("(1,2)", "(2,1)") is None
