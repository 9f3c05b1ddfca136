import json

import pytest

from sapo.data.loaders import DataError, answer_to_text, load_jsonl, load_parquet


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_load_jsonl_fields_meta_and_numbers(tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")  # images are checked when the file is read
    path = write(tmp_path / "d.jsonl", [
        json.dumps({"q": "1+1?", "a": 2, "id": 7}),
        "",
        json.dumps({"q": [{"role": "user", "content": "hi"}], "a": 27.0, "img": "x.png"}),
    ])
    examples = load_jsonl(path, "q", "a", images_field="img")
    assert [e.answer for e in examples] == ["2", "27"]
    assert examples[0].meta == {"id": 7, "source": str(path), "line": 1}
    assert examples[1].prompt == [{"role": "user", "content": "hi"}]
    # a relative image path is resolved against the dataset file's folder
    assert examples[1].images == [str(tmp_path / "x.png")] and examples[1].meta["line"] == 3
    assert load_jsonl(path, "q", "a", limit=1) == examples[:1]


def test_malformed_line_names_file_and_line(tmp_path):
    path = write(tmp_path / "d.jsonl", [json.dumps({"prompt": "p", "answer": "1"}), "{not json"])
    with pytest.raises(DataError, match=r"d\.jsonl: line 2: malformed JSON .*on_error='skip'"):
        load_jsonl(path)


def test_missing_field_names_line_and_fields_present(tmp_path):
    path = write(tmp_path / "d.jsonl", [json.dumps({"prompt": "p", "answer": "1"}), json.dumps({"prompt": "p"})])
    with pytest.raises(DataError, match=r"line 2: missing field 'answer' \(fields in this row: prompt\)"):
        load_jsonl(path)


def test_skip_mode_counts_and_warns(tmp_path, caplog):
    path = write(tmp_path / "d.jsonl", [
        json.dumps({"prompt": "p", "answer": "1"}), "{bad", json.dumps({"prompt": "p"}), "[1, 2]",
        json.dumps({"prompt": "", "answer": "1"}), json.dumps({"prompt": "p", "answer": [1]}),
        json.dumps({"prompt": "q", "answer": "2"}),
    ])
    examples = load_jsonl(path, on_error="skip")
    assert [e.answer for e in examples] == ["1", "2"]
    assert examples.skipped == {"malformed JSON": 1, "missing field 'answer'": 1, "not_an_object": 1,
                                "bad_prompt": 1, "bad_answer": 1}
    assert "skipped 5" in caplog.text and "line 2" in caplog.text


def test_unknown_field_mapping_lists_the_fields(tmp_path):
    path = write(tmp_path / "d.jsonl", [json.dumps({"question": "p", "answer": "1"})] * 3)
    with pytest.raises(DataError, match=r"line 1: missing field 'prompt' \(fields in this row: answer, question\)"):
        load_jsonl(path)
    with pytest.raises(DataError, match=r"no row has field 'prompt'; the rows have fields \['answer', 'question'\]"):
        load_jsonl(path, on_error="skip")


def test_empty_file_is_an_error_in_both_modes(tmp_path):
    path = write(tmp_path / "empty.jsonl", ["", "  "])
    for mode in ("raise", "skip"):
        with pytest.raises(DataError, match=r"empty\.jsonl is empty"):
            load_jsonl(path, on_error=mode)


def test_missing_file_and_bad_mode(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_jsonl(tmp_path / "nope.jsonl")
    path = write(tmp_path / "d.jsonl", [json.dumps({"prompt": "p", "answer": "1"})])
    with pytest.raises(ValueError, match="on_error"):
        load_jsonl(path, on_error="ignore")


def test_answer_fn_errors_are_row_errors(tmp_path):
    path = write(tmp_path / "d.jsonl", [json.dumps({"prompt": "p", "answer": "x"})])

    def parse(value):
        raise ValueError("no number")

    with pytest.raises(DataError, match="line 1: field 'answer': no number"):
        load_jsonl(path, answer_fn=parse)


def test_answer_to_text():
    assert answer_to_text(27.0) == "27"
    assert answer_to_text(2.5) == "2.5"
    assert answer_to_text(" 1/2 ") == "1/2"


def test_parquet_round_trip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"problem": ["a", "b"], "answer": ["1", None]}), path)
    with pytest.raises(DataError, match=r"d\.parquet: row 2: field 'answer' is null"):
        load_parquet(path, "problem")
    examples = load_parquet(path, "problem", on_error="skip")
    assert [(e.prompt, e.answer, e.meta["row"]) for e in examples] == [("a", "1", 1)]
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_parquet(tmp_path / "bad.parquet")
