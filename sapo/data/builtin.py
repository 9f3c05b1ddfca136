"""The built-in CPU task ``builtin:arith``: chained integer arithmetic with a worked answer.

Made for a tiny character-level model. A problem is a chain of 1-3 operations written with
explicit parentheses, so ordinary precedence and the worked left-to-right steps agree:

    prompt:      "(12+7)*3=\\n"
    completion:  "12+7=19 19*3=57 #### 57"
    answer:      "57"

Each step "a op b = c" uses the previous result as ``a``; the final answer follows "####" (graded
exactly by ``sapo.rewards.math_reward``'s fast path). Every character of prompts and completions
is in ``BUILTIN_ALPHABET``; end-of-sequence is the tokenizer's special token, not a character.

Determinism and splits: problems come from ``random.Random(seed)``; whether a problem is in the
"train" or the held-out "test" split is fixed by a hash of its prompt (``heldout_split``), so the
two splits never share a problem. The train split samples i.i.d. (repeats possible); the test split
holds distinct problems.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, fields

from sapo.data.example import Example, ExampleList, heldout_split

BUILTIN_ALPHABET = "0123456789+-*=()# \n"
BUILTIN_ANSWER_FORMAT = "####"
SPLITS = ("train", "test")


@dataclass(frozen=True)
class ArithDifficulty:
    min_ops: int = 1  # operations per problem, drawn uniformly in [min_ops, max_ops]
    max_ops: int = 2
    operand_min: int = 0  # operands of + and - are drawn from [operand_min, operand_max]
    operand_max: int = 20
    mul_operand_max: int = 9  # the right operand of * is drawn from [operand_min, mul_operand_max]
    operators: str = "+-*"

    def __post_init__(self):
        if not 1 <= self.min_ops <= self.max_ops:
            raise ValueError(f"need 1 <= min_ops <= max_ops, got min_ops={self.min_ops}, max_ops={self.max_ops}")
        if not 0 <= self.operand_min <= self.operand_max:
            raise ValueError(f"need 0 <= operand_min <= operand_max, got {self.operand_min}, {self.operand_max}")
        if self.mul_operand_max < self.operand_min:
            raise ValueError(f"mul_operand_max={self.mul_operand_max} is below operand_min={self.operand_min}")
        if not self.operators or set(self.operators) - set("+-*"):
            raise ValueError(f"operators must be a non-empty subset of '+-*', got {self.operators!r}")


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _expression(operands: list[int], operators: list[str]) -> str:
    expr = str(operands[0])
    for i, (op, b) in enumerate(zip(operators, operands[1:])):
        expr = f"({expr}){op}{b}" if i > 0 else f"{expr}{op}{b}"
    return expr


def worked_steps(operands: list[int], operators: list[str], *, drop_signs: bool = False) -> tuple[str, int]:
    """("12+7=19 19*3=57 #### 57", 57) for operands [12, 7, 3] and operators ["+", "*"]. drop_signs: the
    sloppy teacher, who writes every negative result without its sign and carries on with that value."""
    steps, value = [], operands[0]
    for op, b in zip(operators, operands[1:]):
        result = _apply(value, op, b)
        result = abs(result) if drop_signs else result
        steps.append(f"{value}{op}{b}={result}")
        value = result
    return " ".join(steps) + f" #### {value}", value


def sloppy_steps(operands: list[int], operators: list[str]) -> tuple[str, int]:
    """("3-10=7 7*2=14 #### 14", 14) where the truth is "3-10=-7 -7*2=-14": worked_steps(drop_signs=True)."""
    return worked_steps(operands, operators, drop_signs=True)


def has_negative_step(operands: list[int], operators: list[str]) -> bool:
    """Whether the true worked solution has a negative result anywhere (where the sloppy teacher errs)."""
    value = operands[0]
    for op, b in zip(operators, operands[1:]):
        value = _apply(value, op, b)
        if value < 0:
            return True
    return False


def parse_prompt(prompt: str) -> tuple[list[int], list[str]]:
    """Operands and operators of a built-in prompt (inverse of the generator)."""
    body = prompt.rstrip("\n")
    if not body.endswith("="):
        raise ValueError(f"not a built-in arithmetic prompt (expected '...=\\n'): {prompt!r}")
    tokens = re.findall(r"\d+|[+\-*]", body[:-1].replace("(", "").replace(")", ""))
    operands, operators = [int(t) for t in tokens[0::2]], tokens[1::2]
    if len(operands) != len(operators) + 1 or not operators:
        raise ValueError(f"not a built-in arithmetic prompt: {prompt!r}")
    return operands, operators


def make_example(operands: list[int], operators: list[str], split: str) -> Example:
    completion, answer = worked_steps(operands, operators)
    return Example(
        prompt=_expression(operands, operators) + "=\n",
        answer=str(answer),
        meta={"task": "builtin:arith", "split": split, "num_ops": len(operators),
              "answer_format": BUILTIN_ANSWER_FORMAT, "instruction": ""},
    )


def reference_completion(example: Example) -> str:
    """The worked completion for the supervised warm start, e.g. "12+7=19 19*3=57 #### 57"."""
    return worked_steps(*parse_prompt(example.prompt))[0]


def _sample(rng: random.Random, d: ArithDifficulty) -> tuple[list[int], list[str]]:
    n_ops = rng.randint(d.min_ops, d.max_ops)
    operators = [rng.choice(d.operators) for _ in range(n_ops)]
    operands = [rng.randint(d.operand_min, d.operand_max)]
    for op in operators:
        high = d.mul_operand_max if op == "*" else d.operand_max
        operands.append(rng.randint(d.operand_min, high))
    return operands, operators


def builtin_dataset(split: str = "train", n: int = 1000, seed: int = 0, *, heldout_fraction: float = 0.2,
                    **difficulty) -> ExampleList:
    """``n`` arithmetic problems of one split, deterministic in (split, n, seed, difficulty).

    ``difficulty`` takes the fields of ``ArithDifficulty`` (min_ops, max_ops, operand_min,
    operand_max, mul_operand_max, operators)."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    known = {f.name for f in fields(ArithDifficulty)}
    unknown = sorted(set(difficulty) - known)
    if unknown:
        raise ValueError(f"unknown difficulty knob(s) {unknown}; known: {sorted(known)}")
    d = ArithDifficulty(**difficulty)
    return sample_split(
        split, n, random.Random(seed), d, heldout_fraction, ExampleList(source=f"builtin:arith[{split}]"),
        lambda operands, operators: make_example(operands, operators, split),
        too_few=f"builtin:arith found only {{found}} distinct {split} problems of the {n} asked at this difficulty "
                f"({d}); ask for fewer or widen the operand range",
    )


HARD_OPS = 3  # builtin:arith-hard: operations per problem
HARD_MIN_ABS_ANSWER = 10  # and answers of two digits or more, so that guessing cannot score


def hard_dataset(split: str = "train", n: int = 1000, seed: int = 0) -> ExampleList:
    """``builtin:arith-hard``: ``n`` problems of HARD_OPS operations whose answer has at least two
    digits. The coverage-gap task: the warm start's worked solutions are mostly 1-2 operations
    (``warmstart_hard_fraction`` of them are hard), RL trains on these with final answers only."""
    pool = builtin_dataset(split, 3 * n + 50, seed=seed + 1, min_ops=HARD_OPS, max_ops=HARD_OPS)
    kept = [e for e in pool if abs(int(e.answer)) >= HARD_MIN_ABS_ANSWER]
    if len(kept) < n:
        raise ValueError(f"builtin:arith-hard found only {len(kept)} {split} problems of the {n} asked")
    out = ExampleList(source=f"builtin:arith-hard[{split}]")
    for e in kept[:n]:
        e.meta["task"] = "builtin:arith-hard"
        out.append(e)
    return out


NEG_MIN_ABS_ANSWER = 10  # builtin:arith-neg: answers of two digits or more


def negative_dataset(split: str = "train", n: int = 1000, seed: int = 0) -> ExampleList:
    """``builtin:arith-neg``: ``n`` problems of the built-in kind (1-2 operations) whose worked solution
    has a negative result, whose answer has two digits or more, and which the sign-dropping teacher
    (``sloppy_steps``) gets wrong. The demo task: the warm start learns from a teacher that drops the
    minus sign in most of its worked solutions (``warmstart_teacher_sign_error``); RL, rewarded by the
    exact answer, has to learn what the demonstrations got wrong."""
    pool = builtin_dataset(split, 12 * n + 100, seed=seed + 2)
    out = ExampleList(source=f"builtin:arith-neg[{split}]")
    for e in pool:
        operands, operators = parse_prompt(e.prompt)
        if (has_negative_step(operands, operators) and abs(int(e.answer)) >= NEG_MIN_ABS_ANSWER
                and sloppy_steps(operands, operators)[1] != int(e.answer)):
            e.meta["task"] = "builtin:arith-neg"
            out.append(e)
            if len(out) == n:
                return out
    raise ValueError(f"builtin:arith-neg found only {len(out)} {split} problems of the {n} asked")


def sample_split(split: str, n: int, rng: random.Random, d: ArithDifficulty, heldout_fraction: float,
                 examples: ExampleList, build, *, too_few: str, keep=None) -> ExampleList:
    """Draw problems until `examples` holds n of `split`: the split is a hash of the prompt
    ("<expression>=\n"), and the test split holds distinct problems. `build(operands, operators)` makes
    each accepted example (it may draw from rng); `keep(operands, operators)`, if given, filters the
    draws; `too_few` is the error, with {found} filled in."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    seen: set[str] = set()
    attempts, max_attempts = 0, 200 * n + 1000
    while len(examples) < n:
        attempts += 1
        if attempts > max_attempts:
            raise ValueError(too_few.format(found=len(examples)))
        operands, operators = _sample(rng, d)
        prompt = _expression(operands, operators) + "=\n"
        if heldout_split(prompt, heldout_fraction) != split or (keep is not None and not keep(operands, operators)):
            continue
        if split == "test":
            if prompt in seen:
                continue
            seen.add(prompt)
        examples.append(build(operands, operators))
    return examples
