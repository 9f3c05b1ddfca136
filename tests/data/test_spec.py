import json
from pathlib import Path

import pytest

from sapo.data.spec import load_dataset_spec

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def test_builtin_spec():
    examples = load_dataset_spec("builtin:arith", n=5, split="test", seed=2, max_ops=1)
    assert len(examples) == 5 and all(e.meta["split"] == "test" and e.meta["num_ops"] == 1 for e in examples)
    with pytest.raises(ValueError, match="builtin:arith"):
        load_dataset_spec("builtin:algebra")


def test_generic_files_and_field_mapping(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"q": "x", "a": "1"}) + "\n")
    assert load_dataset_spec(str(path), prompt_field="q", answer_field="a")[0].answer == "1"
    assert load_dataset_spec(f"jsonl:{path}", "q", "a")[0].prompt == "x"
    with pytest.raises(ValueError, match="fields in this row: a, q"):
        load_dataset_spec(str(path))


def test_benchmark_spec_with_path_and_overrides(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "w\n#### 5"}) + "\n")
    assert load_dataset_spec(f"gsm8k:{path}")[0].answer == "5"
    other = tmp_path / "m.jsonl"
    other.write_text(json.dumps({"text": "q", "final": "7"}) + "\n")
    assert load_dataset_spec(f"math500:{other}", prompt_field="text", answer_field="final")[0].answer == "7"


@pytest.mark.skipif(not DATA.is_dir(), reason="benchmark data lives in ../shared/data")
def test_benchmark_spec_real_file():
    examples = load_dataset_spec(f"math500:{DATA / 'math500' / 'test.jsonl'}", limit=3)
    assert len(examples) == 3 and examples[0].meta["benchmark"] == "math500"


def test_reasoning_gym_spec():
    pytest.importorskip("reasoning_gym")
    examples = load_dataset_spec("reasoning_gym:chain_sum", n=4, seed=0)
    assert len(examples) == 4


def test_unknown_spec_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="use one of builtin:arith"):
        load_dataset_spec("hub:openai/gsm8k")
    with pytest.raises(FileNotFoundError):
        load_dataset_spec(str(tmp_path / "none.jsonl"))
