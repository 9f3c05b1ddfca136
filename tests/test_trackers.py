"""report_to: the same metric names and steps in every tracker, read back through each tracker's own
files or client (wandb offline, MLflow's local store and a real MLflow server on 127.0.0.1)."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sapo.config import ConfigError, build_config
from sapo.trackers import mlflow_metric_name, resolve_report_to
from sapo.tracking import RunLogger

HAS_WANDB = importlib.util.find_spec("wandb") is not None
HAS_MLFLOW = importlib.util.find_spec("mlflow") is not None
ROWS = [(0, {"eval/pass@1": 0.25, "eval/pass@1_T0.5": 0.5, "eval/greedy": 0.5, "bad": float("nan"), "text": "x"}),
        (1, {"reward/mean": 0.125, "lr": 1e-3}),
        (2, {"reward/mean": 0.375, "eval/pass@1": 0.75, "eval/pass@1_T0.5": 0.625})]
EXPECTED = {"eval/pass@1": [(0, 0.25), (2, 0.75)], "eval/pass@1_T0.5": [(0, 0.5), (2, 0.625)],
            "reward/mean": [(1, 0.125), (2, 0.375)], "eval/greedy": [(0, 0.5)], "lr": [(1, 1e-3)]}


def _log_rows(out: Path, report_to: list[str], rows=ROWS, resume_step=None) -> None:
    logger = RunLogger(out, report_to=report_to, resume_step=resume_step, config={"lr": 1e-3, "seed": 0})
    for step, metrics in rows:
        logger.log(step, metrics)
    logger.close()


def test_report_to_resolves_names_and_the_deprecated_tensorboard_switch():
    assert resolve_report_to(["tensorboard"]) == ("tensorboard",)
    assert resolve_report_to(["TensorBoard", "tensorboard"]) == ("tensorboard",)
    assert resolve_report_to(["none"]) == ()
    assert resolve_report_to(["tensorboard"], tensorboard=False) == ()
    with pytest.raises(ValueError, match="unknown tracker.*'comet'"):
        resolve_report_to(["comet"])
    with pytest.raises(ValueError, match="'none' cannot be combined"):
        resolve_report_to(["none", "tensorboard"])
    assert build_config(overrides={"report_to": "none"}).report_to == ["none"]
    with pytest.raises(ConfigError, match="unknown tracker"):
        build_config(overrides={"report_to": "tensorbord"})


def test_a_missing_tracker_package_is_a_config_error_naming_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'sapo-rl\[wandb\]'"):
        build_config(overrides={"report_to": "wandb"})


def test_mlflow_metric_names():
    assert mlflow_metric_name("eval/pass@1_T0.5") == "eval/pass_at_1_T0.5"
    assert mlflow_metric_name("eval/gsm8k/pass@8") == "eval/gsm8k/pass_at_8"
    assert mlflow_metric_name("sapo/gate_lt_0.5_frac") == "sapo/gate_lt_0.5_frac"
    assert mlflow_metric_name("a<b>") == "a_b_"


def test_report_to_none_writes_the_jsonl_only(tmp_path):
    _log_rows(tmp_path, ["none"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[0]["bad"] == "nan" and rows[0]["text"] == "x"


def test_tensorboard_gets_the_same_names_and_steps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _log_rows(tmp_path, ["tensorboard"])
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == set(EXPECTED)
    for key, want in EXPECTED.items():
        assert [(e.step, pytest.approx(e.value)) for e in acc.Scalars(key)] == want


def _wandb_history(run_file: Path) -> dict[str, list[tuple[int, float]]]:
    """The history rows of an offline .wandb file: a LevelDB-style log (7-byte file header, 32 KiB
    blocks of records with a 7-byte header: crc32, little-endian length, type) of protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, buf, out = run_file.read_bytes(), 7, 32768, b"", {}
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            if record.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                for key, value in items.items():
                    if not key.startswith("_"):  # wandb's own _step, _runtime, _timestamp
                        out.setdefault(key, []).append((record.history.step.num, value))
    return out


@pytest.mark.skipif(not HAS_WANDB, reason="the wandb extra is not installed")
def test_wandb_offline_gets_the_same_names_and_steps(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is the default: no network, no account
    monkeypatch.setenv("WANDB_SILENT", "true")
    _log_rows(tmp_path, ["wandb"])
    run_id = json.loads((tmp_path / "trackers.json").read_text())["wandb"]
    (run_file,) = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    deadline = time.time() + 20  # wandb's service process may still be writing the file when finish() returns
    while (history := _wandb_history(run_file)).get("eval/pass@1", []) != [(0, 0.25), (2, 0.75)] \
            and time.time() < deadline:
        time.sleep(0.5)
    assert {k: [(s, pytest.approx(v)) for s, v in rows] for k, rows in history.items()} == EXPECTED


def _mlflow_history(client, run_id: str) -> dict[str, list[tuple[int, float]]]:
    run = client.get_run(run_id)
    return {key: [(m.step, pytest.approx(m.value)) for m in sorted(client.get_metric_history(run_id, key),
                                                                    key=lambda m: m.step)]
            for key in run.data.metrics}


@pytest.mark.skipif(not HAS_MLFLOW, reason="the mlflow extra is not installed")
def test_mlflow_local_store_and_resume_continue_the_same_run(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _log_rows(tmp_path, ["mlflow"], rows=ROWS[:2])
    _log_rows(tmp_path, ["mlflow"], rows=ROWS[2:], resume_step=1)  # a resume: the same MLflow run continues
    run_id = json.loads((tmp_path / "trackers.json").read_text())["mlflow"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert _mlflow_history(client, run_id) == {mlflow_metric_name(k): v for k, v in EXPECTED.items()}
    run = client.get_run(run_id)
    assert run.data.params == {"lr": "0.001", "seed": "0"} and run.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not HAS_MLFLOW, reason="the mlflow extra is not installed")
def test_mlflow_server_on_localhost_receives_the_run(tmp_path, monkeypatch):
    import urllib.request

    from mlflow.tracking import MlflowClient

    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--default-artifact-root", str(tmp_path / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "server.log", "w"), start_new_session=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": ""},
    )
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.time() > deadline:
                pytest.fail(f"mlflow server did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "sapo-test")
        _log_rows(tmp_path / "run", ["mlflow"])
        run_id = json.loads((tmp_path / "run" / "trackers.json").read_text())["mlflow"]
        client = MlflowClient(uri)
        assert client.get_experiment_by_name("sapo-test").experiment_id == client.get_run(run_id).info.experiment_id
        assert _mlflow_history(client, run_id) == {mlflow_metric_name(k): v for k, v in EXPECTED.items()}
        assert not (tmp_path / "run" / "mlflow.db").exists()  # everything went to the server
    finally:
        os.killpg(server.pid, 15)  # the server and its uvicorn workers (its own session)
        server.wait(timeout=30)
