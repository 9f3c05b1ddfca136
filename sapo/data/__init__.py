"""Data: Examples from JSONL/Parquet files, math benchmarks, reasoning-gym and the built-in task; prompt templates."""

from sapo.data.benchmarks import (
    BENCHMARKS,
    default_data_dir,
    gsm8k_gold_answer,
    load_aime24,
    load_amc23,
    load_benchmark,
    load_gsm8k,
    load_math500,
)
from sapo.data.builtin import (
    BUILTIN_ALPHABET,
    BUILTIN_ANSWER_FORMAT,
    ArithDifficulty,
    builtin_dataset,
    reference_completion,
)
from sapo.data.example import Example, ExampleList, heldout_split
from sapo.data.loaders import DataError, load_jsonl, load_parquet
from sapo.data.reasoning_gym_tasks import load_reasoning_gym
from sapo.data.spec import load_dataset_spec
from sapo.data.templates import DEFAULT_INSTRUCTIONS, build_prompt

__all__ = [
    "BENCHMARKS", "BUILTIN_ALPHABET", "BUILTIN_ANSWER_FORMAT", "DEFAULT_INSTRUCTIONS", "ArithDifficulty",
    "DataError", "Example", "ExampleList", "build_prompt", "builtin_dataset", "default_data_dir",
    "gsm8k_gold_answer", "heldout_split", "load_aime24", "load_amc23", "load_benchmark", "load_dataset_spec",
    "load_gsm8k", "load_jsonl", "load_math500", "load_parquet", "load_reasoning_gym", "reference_completion",
]
