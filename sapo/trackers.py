"""Experiment trackers a run reports to besides metrics.jsonl: TensorBoard, Weights & Biases, MLflow.

`report_to` names them as TRL does (`tensorboard`, `wandb`, `mlflow`, `none`). Every tracker gets the
same metric names and steps as metrics.jsonl, with one exception forced by MLflow, whose names may not
contain "@": there `eval/pass@8` is logged as `eval/pass_at_8` (`mlflow_metric_name`).

Where they write, without a network:
  - tensorboard: output_dir/tensorboard (event files).
  - wandb: offline unless WANDB_MODE says otherwise; the run lives in output_dir/wandb and
    `wandb sync output_dir/wandb/offline-run-*` uploads it later. WANDB_PROJECT names the project
    (default "sapo").
  - mlflow: MLFLOW_TRACKING_URI when set (a server, e.g. http://127.0.0.1:5000), else a local SQLite store
    output_dir/mlflow.db (`mlflow ui --backend-store-uri sqlite:///ABS/PATH/mlflow.db`). MLFLOW_EXPERIMENT_NAME names
    the experiment (default "sapo").

A resumed run continues the same wandb / MLflow run: their ids are kept in output_dir/trackers.json.
Steps logged after the checkpoint being resumed are logged again: TensorBoard purges the old ones (as
metrics.jsonl does), wandb keeps the first value of a step it has seen, and MLflow keeps both values.
wandb and mlflow are optional extras (`pip install sapo-rl[wandb]`, `[mlflow]`); asking for one that is
not installed is an error that says what to install, raised before any training.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

TRACKERS = ("tensorboard", "wandb", "mlflow")
IDS_FILE = "trackers.json"  # the wandb / MLflow run ids, so a resume continues the same runs
_MLFLOW_BAD = re.compile(r"[^\w\-. :/]")


def resolve_report_to(report_to: list[str] | tuple[str, ...], *, tensorboard: bool = True) -> tuple[str, ...]:
    """The trackers a config asks for: report_to without "none", and without "tensorboard" when the
    deprecated `tensorboard=false` is set. Raises ValueError on an unknown name or "none" with others."""
    names = [str(n).strip().lower() for n in report_to]
    unknown = [n for n in names if n not in (*TRACKERS, "none")]
    if unknown:
        raise ValueError(f"report_to: unknown tracker(s) {unknown}; choose from {', '.join((*TRACKERS, 'none'))}")
    if "none" in names and len(names) > 1:
        raise ValueError(f"report_to: 'none' cannot be combined with other trackers, got {names}")
    out = [n for n in dict.fromkeys(names) if n != "none"]
    if not tensorboard and "tensorboard" in out:
        out.remove("tensorboard")
    return tuple(out)


def check_installed(trackers: tuple[str, ...]) -> None:
    """Raise ImportError naming the extra to install for each tracker whose package is missing."""
    import importlib.util

    missing = [t for t in trackers if t in ("wandb", "mlflow") and importlib.util.find_spec(t) is None]
    if missing:
        raise ImportError(f"report_to={','.join(missing)} needs the package(s) {', '.join(missing)}: "
                          f"pip install 'sapo-rl[{','.join(missing)}]' (or remove them from report_to)")


def mlflow_metric_name(key: str) -> str:
    """MLflow's form of a metric name: "@" becomes "_at_", any other character MLflow refuses "_"."""
    return _MLFLOW_BAD.sub("_", key.replace("@", "_at_"))


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


class _TensorBoard:
    def __init__(self, output_dir: Path, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=resume_step)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, output_dir: Path, run_id: str | None, config: dict):
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "sapo"), name=output_dir.name, dir=str(output_dir),
            config=config, id=run_id, resume="allow" if run_id else None,
            mode=os.environ.get("WANDB_MODE", "offline"),  # no network needed; `wandb sync` uploads later
            settings=wandb.Settings(silent=True, console="off"),
        )
        self.id = self.run.id

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, output_dir: Path, run_id: str | None, config: dict):
        from mlflow.tracking import MlflowClient

        # MLflow 3 refuses new file stores: the local store is SQLite (`mlflow ui --backend-store-uri URI`)
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(output_dir / 'mlflow.db').resolve()}"
        self.client = MlflowClient(tracking_uri=uri)
        self.uri = uri
        if run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "sapo")
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            self.id = self.client.create_run(experiment_id, run_name=output_dir.name).info.run_id
            self._log_params(config)
        else:  # a resumed run continues its MLflow run
            self.id = run_id
            self.client.update_run(run_id, status="RUNNING")

    def _log_params(self, config: dict) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)[:500]) for k, v in sorted(config.items())]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.id, params=params[i:i + 100])

    def log(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(mlflow_metric_name(k), v, now, step) for k, v in scalars.items()]
        for i in range(0, len(metrics), 1000):  # MLflow's limit per batch
            self.client.log_batch(self.id, metrics=metrics[i:i + 1000])

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.client.set_terminated(self.id)


class Trackers:
    """The external trackers of one run (rank 0): each gets every numeric, finite metric of each row."""

    def __init__(self, output_dir: str | Path, trackers: tuple[str, ...], *, resume_step: int | None = None,
                 config: dict | None = None):
        check_installed(trackers)
        self.output_dir = Path(output_dir)
        ids_path = self.output_dir / IDS_FILE
        ids = json.loads(ids_path.read_text()) if resume_step is not None and ids_path.exists() else {}
        config = {k: v for k, v in (config or {}).items() if v is not None}
        self.backends: list = []
        try:
            if "tensorboard" in trackers:
                self.backends.append(_TensorBoard(self.output_dir, resume_step))
            if "wandb" in trackers:
                self.backends.append(_Wandb(self.output_dir, ids.get("wandb"), config))
                ids["wandb"] = self.backends[-1].id
            if "mlflow" in trackers:
                self.backends.append(_MLflow(self.output_dir, ids.get("mlflow"), config))
                ids["mlflow"] = self.backends[-1].id
        except Exception:
            self.close()  # the ones already started (wandb's service process)
            raise
        if ids:
            ids_path.write_text(json.dumps(ids, indent=1))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        scalars = _scalars(metrics)
        if scalars:
            for backend in self.backends:
                backend.log(step, scalars)

    def flush(self) -> None:
        for backend in self.backends:
            backend.flush()

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
        self.backends = []
