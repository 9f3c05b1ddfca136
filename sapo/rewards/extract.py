"""Final-answer extraction from a model completion (or a reference solution).

Order of preference, each taking the LAST occurrence in the text:
  1. ``\\boxed{...}`` / ``\\fbox{...}`` with balanced braces (also ``\\boxed 5``),
  2. ``#### <answer>`` (GSM8K style, up to the end of the line),
  3. ``The answer is X`` / ``The final answer is X`` (up to the end of the line).

Every step is linear in the length of the text (one pass to match braces, ``rfind`` and a
bounded regex on single lines), so a multi-megabyte or deeply nested completion costs
milliseconds, never a hang.
"""

from __future__ import annotations

import re

BOX_COMMANDS = ("\\boxed", "\\fbox")
# An extracted answer longer than this is not a final answer; it is treated as "no answer".
MAX_ANSWER_CHARS = 1000

_BRACE_RE = re.compile(r"\\[{}]|[{}]")
# Only the end of a longer text is searched: a final answer is at the end.
MAX_TEXT_CHARS = 1_000_000
_ANSWER_IS_RE = re.compile(r"the\s+(?:final\s+)?answer\s+is\b[:\s]*", re.IGNORECASE)


def _matching_braces(text: str) -> dict[int, int]:
    """Map each '{' index to its matching '}' index (one pass over the braces, no recursion)."""
    match: dict[int, int] = {}
    stack: list[int] = []
    for brace in _BRACE_RE.finditer(text):
        ch = brace.group()
        if ch == "{":
            stack.append(brace.start())
        elif ch == "}" and stack:
            match[stack.pop()] = brace.start()
        # an escaped brace \{ or \} is literal text, not grouping
    return match


def _box_starts(text: str) -> list[tuple[int, int]]:
    """(start of the command, index just after the command name) of every box command."""
    starts = []
    for command in BOX_COMMANDS:
        pos = text.find(command)
        while pos != -1:
            after = pos + len(command)
            # \boxed must not be the prefix of a longer command name (e.g. \boxedfoo).
            if after >= len(text) or not text[after].isalpha():
                starts.append((pos, after))
            pos = text.find(command, after)
    starts.sort()
    return starts


def find_boxed(text: str) -> list[str]:
    """Contents of every well-formed box command, in order of appearance."""
    if not any(command in text for command in BOX_COMMANDS):
        return []
    match = _matching_braces(text)
    found = []
    for _, after in _box_starts(text):
        j = after
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{":
            if j in match:  # an unclosed brace (truncated completion) is not an answer
                found.append(text[j + 1 : match[j]])
        elif j > after:  # "\boxed 5": one token after a space, MATH uses this form
            token = re.match(r"[^\s$]+", text[j : j + MAX_ANSWER_CHARS + 1])
            if token:
                found.append(token.group(0))
    return found


def _rest_of_line(text: str, start: int) -> str:
    end = text.find("\n", start)
    return text[start : end if end != -1 else len(text)]


def _clean(answer: str) -> str | None:
    answer = answer.strip()
    if not answer or len(answer) > MAX_ANSWER_CHARS:
        return None
    return answer


def extract_hash_answer(text: str) -> str | None:
    """The text after the last ``####`` on its line (GSM8K reference format)."""
    pos = text.rfind("####")
    if pos == -1:
        return None
    return _clean(_rest_of_line(text, pos + 4).lstrip("#"))


def _extract_answer_is(text: str) -> str | None:
    # Search line by line from the end: each regex runs on one line, so the cost stays linear.
    for line in reversed(text.splitlines()):
        matches = list(_ANSWER_IS_RE.finditer(line))
        if matches:
            last = matches[-1]
            answer = line[last.end() :].strip()
            # "The answer is $18$." -> "18"
            answer = answer.rstrip(".").strip()
            if len(answer) >= 2 and answer[0] == "$" and answer[-1] == "$":
                answer = answer.strip("$")
            return _clean(answer)
    return None


def extract_answer(text: str) -> str | None:
    """The final answer in ``text``, or None when there is none (see the module docstring)."""
    if not isinstance(text, str) or not text:
        return None
    text = text[-MAX_TEXT_CHARS:]
    boxed = find_boxed(text)
    if boxed:
        return _clean(boxed[-1])
    answer = extract_hash_answer(text)
    if answer is not None:
        return answer
    if "answer" in text or "Answer" in text or "ANSWER" in text:
        return _extract_answer_is(text)
    return None
