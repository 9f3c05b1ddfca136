"""Run outputs: metrics.jsonl (one row per step), samples.jsonl, and the trackers of report_to
(TensorBoard, wandb, MLflow: sapo.trackers).

On resume, rows written after the checkpoint being resumed are dropped, so each step appears
exactly once in metrics.jsonl and samples.jsonl.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def _jsonl_rows(path: Path) -> list[tuple[str, dict]]:
    """(line, row) for each whole line of a JSONL file; a line torn by a kill mid-write is skipped."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append((line, json.loads(line)))
        except json.JSONDecodeError:
            continue
    return out


def _truncate_jsonl(path: Path, max_step: int) -> None:
    """Keep the rows with step <= max_step (and drop a torn last line), rewriting the file atomically."""
    if not path.exists():
        return
    kept = [line for line, row in _jsonl_rows(path) if row.get("step", 0) <= max_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep it visible instead of crashing
    return value


class RunLogger:
    """metrics.jsonl and samples.jsonl (always), and the external trackers named in `report_to`.

    `tensorboard=` is the old switch, kept so callers that pass it still work: False removes
    tensorboard from report_to."""

    def __init__(self, output_dir: str | Path, *, report_to: tuple[str, ...] | list[str] = ("tensorboard",),
                 tensorboard: bool = True, resume_step: int | None = None, config: dict | None = None):
        from sapo.trackers import Trackers, resolve_report_to

        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.output_dir / "metrics.jsonl"
        self.samples_path = self.output_dir / "samples.jsonl"
        if resume_step is None:
            for p in (self.metrics_path, self.samples_path):
                if p.exists():
                    p.unlink()
        else:
            _truncate_jsonl(self.metrics_path, resume_step)
            _truncate_jsonl(self.samples_path, resume_step)
        self.trackers = Trackers(self.output_dir, resolve_report_to(report_to, tensorboard=tensorboard),
                                 resume_step=resume_step, config=config)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        self.trackers.log(step, metrics)

    def log_samples(self, step: int, rows: list[dict]) -> None:
        with open(self.samples_path, "a") as f:
            for row in rows:
                f.write(json.dumps({"step": step, **row}) + "\n")

    def flush(self) -> None:
        self.trackers.flush()

    def close(self) -> None:
        self.trackers.close()


class NullLogger:
    """The logger of ranks other than 0 in a data-parallel run: only rank 0 writes files."""

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def log_samples(self, step: int, rows: list[dict]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def read_metrics(output_dir: str | Path) -> list[dict]:
    """The rows of a run's metrics.jsonl (empty when there is none)."""
    return [row for _, row in _jsonl_rows(Path(output_dir) / "metrics.jsonl")]


def merge_metrics(rows: list[dict[str, float]], *, sum_prefixes: tuple[str, ...] = ()) -> dict[str, float]:
    """One row from several (micro-batches, updates or ranks): */min and */max exactly, keys under
    sum_prefixes summed, everything else averaged; non-finite and non-numeric values are left out."""
    out: dict[str, float] = {}
    for key in sorted({k for r in rows for k in r}):
        vals = [r[key] for r in rows
                if isinstance(r.get(key), int | float) and not isinstance(r[key], bool) and math.isfinite(r[key])]
        if not vals:
            continue
        if key.endswith("/min"):
            out[key] = min(vals)
        elif key.endswith("/max"):
            out[key] = max(vals)
        elif sum_prefixes and key.startswith(sum_prefixes):
            out[key] = sum(vals)
        else:
            out[key] = sum(vals) / len(vals)
    return out
