"""Cheap answer comparison that decides most cases before math-verify is needed.

``fast_compare(gold, pred)`` returns True (certainly equal), False (certainly different) or
None (undecided: ask math-verify). It only says True/False when both sides are plain strings it
fully understands:
  - the same string after removing formatting (``$``, ``\\text{}``, ``\\left``/``\\right``,
    spaces, ``\\!``, ``\\,``, ``\\dfrac`` -> ``\\frac``, degree signs, a trailing period);
  - two plain numbers: integers with or without thousands separators ("1,000"), decimals
    ("18.0"), fractions ("3/4", "\\frac{3}{4}"), an optional currency sign ("$18") or percent
    sign ("50%" == "50"); compared exactly as rationals.
"""

from __future__ import annotations

import re
from fractions import Fraction

_TEXT_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf|textit|mbox)\{([^{}]*)\}")
_REMOVE = (
    "\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ", "^\\circ", "^{\\circ}", "\\displaystyle",
)
_INTEGER = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)")
_DECIMAL = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)?\.\d+|[+-]?\d+\.")
_SLASH_FRACTION = re.compile(r"([+-]?\d+)/(\d+)")
_LATEX_FRACTION_BRACED = re.compile(r"([+-]?)\\frac\{([+-]?\d+)\}\{(\d+)\}|([+-]?)\\frac(\d)(\d)")


def normalize_answer(answer: str) -> str:
    """Strip formatting that never changes the value (see the module docstring)."""
    text = answer.strip()
    text = text.replace("\\$", "").replace("$", "")
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    for token in _REMOVE:
        text = text.replace(token, "")
    # \text{Evelyn} -> Evelyn; loop for nested wrappers, bounded by the string length.
    for _ in range(8):
        new = _TEXT_WRAPPERS.sub(r"\1", text)
        if new == text:
            break
        text = new
    text = text.replace(" ", "").replace("\n", "")
    text = text.rstrip(".")
    return text


def parse_number(answer: str) -> Fraction | None:
    """The exact value of a plain number, or None when ``answer`` is anything else."""
    text = normalize_answer(answer)
    if text.endswith("\\%"):
        text = text[:-2]
    elif text.endswith("%"):
        text = text[:-1]
    if not text or len(text) > 64:
        return None
    if _INTEGER.fullmatch(text):
        return Fraction(int(text.replace(",", "")))
    if _DECIMAL.fullmatch(text):
        return Fraction(text.replace(",", ""))
    match = _SLASH_FRACTION.fullmatch(text)
    if match and int(match.group(2)) != 0:
        return Fraction(int(match.group(1)), int(match.group(2)))
    match = _LATEX_FRACTION_BRACED.fullmatch(text)
    if match:
        sign, num, den = (match.group(1), match.group(2), match.group(3))
        if num is None:
            sign, num, den = match.group(4), match.group(5), match.group(6)
        if int(den) != 0:
            value = Fraction(int(num), int(den))
            return -value if sign == "-" else value
    return None


def fast_compare(gold: str, pred: str) -> bool | None:
    """True / False when certain, None when math-verify has to decide."""
    gold_norm, pred_norm = normalize_answer(gold), normalize_answer(pred)
    if gold_norm and gold_norm == pred_norm:
        return True
    gold_value, pred_value = parse_number(gold), parse_number(pred)
    if gold_value is not None and pred_value is not None:
        return gold_value == pred_value
    return None
