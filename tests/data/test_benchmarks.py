import json
from pathlib import Path

import pytest

from sapo.data.benchmarks import default_data_dir, gsm8k_gold_answer, load_benchmark
from sapo.data.loaders import DataError

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="benchmark data lives in ../shared/data")


def test_gsm8k_gold_answer():
    assert gsm8k_gold_answer("a\nb #### 1,000 ") == "1,000"
    with pytest.raises(ValueError, match="no '#### <answer>'"):
        gsm8k_gold_answer("no marker")


@needs_data
def test_default_data_dir_is_shared_data():
    assert default_data_dir().resolve() == DATA.resolve()


@needs_data
@pytest.mark.parametrize("name,rows,first_answer", [
    ("gsm8k", 1319, "18"), ("math500", 500, r"\left( 3, \frac{\pi}{2} \right)"), ("aime24", 30, None),
    ("amc23", 40, "27"),
])
def test_real_benchmark_files(name, rows, first_answer):
    examples = load_benchmark(name)
    assert len(examples) == rows
    assert all(isinstance(e.prompt, str) and e.prompt and e.answer for e in examples)
    assert examples[0].meta["benchmark"] == name and examples[0].meta["line"] == 1
    if first_answer is not None:
        assert examples[0].answer == first_answer
    if name == "amc23":
        assert not any(e.answer.endswith(".0") for e in examples)
    if name == "gsm8k":
        assert examples[0].meta["solution"].endswith("#### 18")
    if name == "aime24":
        raw = json.loads((DATA / "aime24" / "test.jsonl").open().readline())
        assert examples[0].answer == str(raw["answer"]).strip()


def test_gsm8k_row_without_marker(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "just text"}) + "\n")
    with pytest.raises(DataError, match=r"line 1: field 'answer': GSM8K solution has no"):
        load_benchmark("gsm8k", path)


def test_unknown_benchmark():
    with pytest.raises(ValueError, match="known: gsm8k, math500"):
        load_benchmark("mmlu")
