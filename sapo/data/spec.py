"""``load_dataset_spec("gsm8k:PATH")``: one string names any dataset the library can read.

| spec                          | what                                                         |
|-------------------------------|--------------------------------------------------------------|
| ``builtin:arith``             | the built-in arithmetic task (kwargs: split, n, seed, difficulty) |
| ``builtin:vl-digits``         | the built-in visual task: the expression is in an image (same kwargs) |
| ``builtin:arith-hard``, ``builtin:arith-neg``, ``builtin:vl-digits-neg`` | the coverage-gap tasks (split, n, seed) |
| ``gsm8k:PATH``, ``math500:PATH``, ``aime24:PATH``, ``amc23:PATH`` | a benchmark file; PATH may be empty for its file under ``default_data_dir()`` |
| ``reasoning_gym:TASK``        | a reasoning-gym generator (kwargs: n, seed, split, task config) |
| ``PATH.jsonl`` / ``PATH.parquet`` (or ``jsonl:PATH`` / ``parquet:PATH``) | a file with prompt_field / answer_field |
"""

from __future__ import annotations

from pathlib import Path

from sapo.data.benchmarks import BENCHMARKS, load_benchmark
from sapo.data.builtin import builtin_dataset
from sapo.data.example import ExampleList
from sapo.data.loaders import load_jsonl, load_parquet
from sapo.data.reasoning_gym_tasks import load_reasoning_gym

SPEC_FORMS = ("builtin:arith", "builtin:arith-hard", "builtin:arith-neg", "builtin:vl-digits", "builtin:vl-digits-neg",
              "gsm8k:PATH", "math500:PATH", "aime24:PATH", "amc23:PATH", "reasoning_gym:TASK", "PATH.jsonl",
              "PATH.parquet")


def _file_kwargs(kwargs: dict) -> dict:
    allowed = {"images_field", "answer_fn", "on_error", "limit"}
    return {k: v for k, v in kwargs.items() if k in allowed}


def load_dataset_spec(spec: str, prompt_field: str | None = None, answer_field: str | None = None,
                      seed: int = 0, **kwargs) -> ExampleList:
    """Examples named by ``spec`` (see the module table). ``prompt_field`` / ``answer_field`` map
    the fields of a generic file (default "prompt" / "answer") or override a benchmark's own;
    other kwargs go to the loader (``split``, ``n``, difficulty knobs, ``on_error``, ``limit``)."""
    kind, sep, rest = spec.partition(":")
    if sep and kind == "builtin":
        if rest == "vl-digits":
            from sapo.data.visual_task import visual_dataset

            return visual_dataset(kwargs.pop("split", "train"), kwargs.pop("n", 1000), seed, **kwargs)
        if rest == "vl-digits-neg":
            from sapo.data.visual_task import negative_visual_dataset

            return negative_visual_dataset(kwargs.pop("split", "train"), kwargs.pop("n", 1000), seed)
        if rest == "arith-hard":
            from sapo.data.builtin import hard_dataset

            return hard_dataset(kwargs.pop("split", "train"), kwargs.pop("n", 1000), seed)
        if rest == "arith-neg":
            from sapo.data.builtin import negative_dataset

            return negative_dataset(kwargs.pop("split", "train"), kwargs.pop("n", 1000), seed)
        if rest != "arith":
            raise ValueError(f"unknown built-in task {spec!r}; the built-in tasks are 'builtin:arith', "
                             "'builtin:arith-hard', 'builtin:arith-neg', 'builtin:vl-digits', 'builtin:vl-digits-neg'")
        return builtin_dataset(kwargs.pop("split", "train"), kwargs.pop("n", 1000), seed, **kwargs)
    if sep and kind == "reasoning_gym":
        if not rest:
            raise ValueError("reasoning_gym needs a task name, e.g. 'reasoning_gym:chain_sum'")
        return load_reasoning_gym(rest, seed=seed, **kwargs)
    if sep and kind in BENCHMARKS:
        if prompt_field or answer_field:  # a copy of the benchmark with other field names
            return load_jsonl(rest, prompt_field or BENCHMARKS[kind].prompt_field,
                              answer_field or BENCHMARKS[kind].answer_field, **_file_kwargs(kwargs))
        return load_benchmark(kind, rest or None, **{k: v for k, v in _file_kwargs(kwargs).items()
                                                      if k != "images_field"})  # text benchmarks
    path = rest if sep and kind in ("jsonl", "parquet") else spec
    suffix = kind if sep and kind in ("jsonl", "parquet") else Path(path).suffix.lstrip(".")
    if suffix in ("jsonl", "json", "parquet"):
        loader = load_parquet if suffix == "parquet" else load_jsonl
        return loader(path, prompt_field or "prompt", answer_field or "answer", **_file_kwargs(kwargs))
    raise ValueError(f"cannot read dataset {spec!r}: use one of {', '.join(SPEC_FORMS)}")
