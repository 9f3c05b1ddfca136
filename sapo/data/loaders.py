"""JSONL and Parquet files -> Examples, with a field mapping and defined behaviour on bad rows.

``on_error="raise"`` (default): the first bad row raises ``DataError`` naming the file, the line
(JSONL, 1-based) or row (Parquet, 1-based), what is wrong and how to fix it.
``on_error="skip"``: bad rows are skipped and counted (``ExampleList.skipped``) and one warning
summarises them. In both modes a file that yields no example at all is an error, and a field that
no row has is reported with the fields the rows do have.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sapo.data.example import Example, ExampleList

logger = logging.getLogger(__name__)
ON_ERROR = ("raise", "skip")


class DataError(ValueError):
    """A dataset file or row that cannot be used; the message says where and how to fix it."""


class RowError(ValueError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def answer_to_text(value: Any) -> str:
    """A gold answer as text: numbers lose a spurious ".0" (27.0 -> "27")."""
    if isinstance(value, bool):
        raise RowError("bad_answer", f"answer is a boolean ({value}); expected a string or a number")
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, (int, str)):
        text = str(value).strip()
        if not text:
            raise RowError("bad_answer", "answer is empty")
        return text
    raise RowError("bad_answer", f"answer is a {type(value).__name__}; expected a string or a number")


def check_prompt(value: Any) -> str | list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise RowError("bad_prompt", "prompt is empty")
        return value
    if isinstance(value, list) and value and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), (str, list))
        for m in value
    ):
        return value
    raise RowError("bad_prompt", "prompt must be a non-empty string or a list of {'role': ..., 'content': ...} "
                   f"messages, got {type(value).__name__}")


def row_to_example(row: Any, prompt_field: str, answer_field: str, *, images_field: str | None = None,
                   answer_fn: Callable[[Any], str] | None = None) -> Example:
    """One row (a dict) -> Example; raises RowError saying what is wrong."""
    if not isinstance(row, dict):
        raise RowError("not_an_object", f"row is a JSON {type(row).__name__}, expected an object {{...}}")
    for name in (prompt_field, answer_field):
        if name not in row:
            raise RowError(f"missing field '{name}'",
                           f"missing field '{name}' (fields in this row: {', '.join(sorted(row)) or 'none'})")
        if row[name] is None:
            raise RowError(f"null field '{name}'", f"field '{name}' is null")
    prompt = check_prompt(row[prompt_field])
    if answer_fn is None:
        answer = answer_to_text(row[answer_field])
    else:
        try:
            answer = answer_fn(row[answer_field])
        except RowError:
            raise
        except ValueError as err:
            raise RowError("bad_answer", f"field '{answer_field}': {err}") from None
    images = (row.get(images_field) or []) if images_field else []
    if not isinstance(images, list):
        images = [images]
    used = {prompt_field, answer_field, images_field}
    meta = {k: v for k, v in row.items() if k not in used}
    if answer_fn is not None and answer != row[answer_field]:
        meta["raw_answer"] = row[answer_field]  # e.g. GSM8K's worked solution
    return Example(prompt=prompt, answer=answer, images=images, meta=meta)


def _checked_images(images: list, base_dir: Path) -> list:
    """Each image as a resolved path or its bytes, after checking it decodes (RowError otherwise)."""
    from sapo.data.multimodal import ImageError, check_image

    out = []
    for i, image in enumerate(images):
        try:
            out.append(check_image(image, base_dir))
        except ImageError as err:
            raise RowError("bad_image", f"image {i}: {err}") from None
    return out


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, parsed row or None, JSON error or None) for each non-blank line."""
    with path.open("rb") as f:  # bytes: one bad line must not hide the others' line numbers
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield line_no, None, f"not UTF-8 text (byte {err.start + 1}: {raw[err.start:err.start + 1]!r})"
                continue
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line), None
            except json.JSONDecodeError as err:
                yield line_no, None, f"malformed JSON ({err.msg} at column {err.colno})"
            except RecursionError:
                yield line_no, None, "malformed JSON (nested too deeply to parse)"


def _collect(rows: Iterator[tuple[int, Any, str | None]], where: str, path: Path, prompt_field: str,
             answer_field: str, on_error: str, limit: int | None, **row_kwargs) -> ExampleList:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    examples = ExampleList(source=str(path))
    first_error: dict[str, str] = {}
    fields_seen: set[str] = set()
    n_rows = 0
    for number, row, json_error in rows:
        n_rows += 1
        try:
            if json_error is not None:
                raise RowError("malformed JSON", json_error)
            if isinstance(row, dict):
                fields_seen.update(row)
            example = row_to_example(row, prompt_field, answer_field, **row_kwargs)
            if example.images:
                example.images = _checked_images(example.images, path.parent)
        except RowError as err:
            message = f"{path}: {where} {number}: {err}"
            if on_error == "raise":
                raise DataError(f"{message}. Fix that {where}, choose other fields with "
                                f"prompt_field=/answer_field=, or skip bad rows (data_on_error=skip; on_error='skip' "
                                "from Python)") from None
            examples.skipped[err.reason] = examples.skipped.get(err.reason, 0) + 1
            first_error.setdefault(err.reason, message)
            continue
        example.meta.setdefault("source", str(path))
        example.meta.setdefault(where, number)
        examples.append(example)
        if limit is not None and len(examples) >= limit:
            break
    if n_rows == 0:
        raise DataError(f"{path} is empty: expected one JSON object per {where} with fields "
                        f"'{prompt_field}' and '{answer_field}'")
    if not examples:
        missing = [f for f in (prompt_field, answer_field) if f not in fields_seen]
        if missing and fields_seen:
            raise DataError(f"{path}: no row has field {', '.join(repr(m) for m in missing)}; the rows have "
                            f"fields {sorted(fields_seen)}: set prompt_field=/answer_field= to one of them")
        raise DataError(f"{path}: all {n_rows} rows are bad; first problem: {next(iter(first_error.values()))}")
    if examples.skipped:
        logger.warning("%s; first of each: %s", examples.summary(), "; ".join(first_error.values()))
    return examples


def _check_path(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} does not exist")
    return path


def load_jsonl(path: str | Path, prompt_field: str = "prompt", answer_field: str = "answer", *,
               images_field: str | None = None, answer_fn: Callable[[Any], str] | None = None,
               on_error: str = "raise", limit: int | None = None) -> ExampleList:
    """Examples from a JSON-lines file: one object per line; blank lines are ignored.

    Every field other than the prompt/answer/images fields goes to ``Example.meta``, with
    ``source`` (the file) and ``line`` (1-based line number). ``answer_fn`` maps the raw answer
    field to the gold answer string (e.g. GSM8K's text after "####")."""
    path = _check_path(path)
    return _collect(_jsonl_rows(path), "line", path, prompt_field, answer_field, on_error, limit,
                    images_field=images_field, answer_fn=answer_fn)


def load_parquet(path: str | Path, prompt_field: str = "prompt", answer_field: str = "answer", *,
                 images_field: str | None = None, answer_fn: Callable[[Any], str] | None = None,
                 on_error: str = "raise", limit: int | None = None) -> ExampleList:
    """Examples from a Parquet file (same field mapping and error behaviour as ``load_jsonl``)."""
    path = _check_path(path)
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError("reading Parquet needs pyarrow: pip install pyarrow "
                          "(or convert the file to JSONL and use load_jsonl)") from err
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises its own error types for damaged files
        raise DataError(f"{path}: not a readable Parquet file ({err})") from err
    numbered = ((i, row, None) for i, row in enumerate(rows, start=1))
    return _collect(numbered, "row", path, prompt_field, answer_field, on_error, limit,
                    images_field=images_field, answer_fn=answer_fn)
