"""The math benchmarks in ../shared/data (see its README), read through the ordinary JSONL loader.

| name    | prompt field | answer field | gold answer                                    |
|---------|--------------|--------------|------------------------------------------------|
| gsm8k   | question     | answer       | the text after "####" in the worked solution   |
| math500 | problem      | answer       | LaTeX as given ("\\frac{14}{3}")                |
| aime24  | problem      | answer       | integer string                                 |
| amc23   | problem      | answer       | number; 27.0 -> "27"                           |
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sapo.data.example import ExampleList
from sapo.data.loaders import load_jsonl


def gsm8k_gold_answer(solution) -> str:
    """GSM8K's gold answer: the text after the last "####" of the worked solution."""
    text = str(solution)
    if "####" not in text:
        raise ValueError("GSM8K solution has no '#### <answer>' line")
    answer = text.rsplit("####", 1)[1].strip()
    if not answer:
        raise ValueError("GSM8K solution has nothing after '####'")
    return answer


@dataclass(frozen=True)
class BenchmarkFormat:
    prompt_field: str
    answer_field: str
    default_file: str  # relative to the data directory
    gold_from_solution: bool = False  # GSM8K: the answer field is a worked solution


BENCHMARKS = {
    "gsm8k": BenchmarkFormat("question", "answer", "gsm8k/test.jsonl", gold_from_solution=True),
    "math500": BenchmarkFormat("problem", "answer", "math500/test.jsonl"),
    "aime24": BenchmarkFormat("problem", "answer", "aime24/test.jsonl"),
    "amc23": BenchmarkFormat("problem", "answer", "amc23/test.jsonl"),
}


def default_data_dir() -> Path:
    """$SAPO_DATA_DIR, else ``shared/data`` beside the repository checkout."""
    if os.environ.get("SAPO_DATA_DIR"):
        return Path(os.environ["SAPO_DATA_DIR"])
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def load_benchmark(name: str, path: str | Path | None = None, *, on_error: str = "raise",
                   limit: int | None = None) -> ExampleList:
    """Examples of a named benchmark from ``path`` (default: its file in ``default_data_dir()``)."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    fmt = BENCHMARKS[name]
    path = Path(path) if path else default_data_dir() / fmt.default_file
    examples = load_jsonl(path, fmt.prompt_field, fmt.answer_field, on_error=on_error, limit=limit,
                          answer_fn=gsm8k_gold_answer if fmt.gold_from_solution else None)
    for example in examples:
        example.meta["benchmark"] = name
        example.meta["answer_format"] = "boxed"
        if fmt.gold_from_solution and "raw_answer" in example.meta:  # the worked solution
            example.meta["solution"] = example.meta.pop("raw_answer")
    return examples


def load_gsm8k(path: str | Path | None = None, **kwargs) -> ExampleList:
    return load_benchmark("gsm8k", path, **kwargs)


def load_math500(path: str | Path | None = None, **kwargs) -> ExampleList:
    return load_benchmark("math500", path, **kwargs)


def load_aime24(path: str | Path | None = None, **kwargs) -> ExampleList:
    return load_benchmark("aime24", path, **kwargs)


def load_amc23(path: str | Path | None = None, **kwargs) -> ExampleList:
    return load_benchmark("amc23", path, **kwargs)
