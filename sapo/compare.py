"""`sapo compare`: the MoE stability and off-policy studies. Several objectives, same task, model, data order
and seeds; the grids are in compare_grids.py.

Each run is `sapo train key=value ...` in its own subprocess (a crash or a NaN stop of one run never
takes the study down), sequentially or `--jobs N` at a time. A run's folder is named by its config,
not by the study part that asked for it, so a config shared by two parts (e.g. `tau_neg=1.05` is the
`sapo` default) runs once. A finished run is skipped, a run with a checkpoint is resumed: a long grid
continues where it stopped. The summary (table.md/csv, frontier, plots) is rebuilt from metrics.jsonl.

Collapse (docs/moe_study.md): a run collapsed when any of
  - it stopped on non-finite updates (exit 3) or logged a non-finite Pass@1 / loss / reward,
  - held-out Pass@1 fell below DROP x its best at an evaluation after the best (best >= MIN_BEST),
  - the mean completion length stayed at >= CAP_FRAC x max_completion_length for CAP_WINDOW steps.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from sapo.checkpoint import EXIT_NONFINITE
from sapo.compare_grids import (  # noqa: F401  (the grids' names are part of this module's API)
    DENSE,
    GRIDS,
    MOE,
    OBJECTIVES,
    QUIET,
    RunSpec,
    StudyGrid,
    custom_grid,
    make_grid,
)
from sapo.tracking import read_metrics

DROP, MIN_BEST, CAP_FRAC, CAP_WINDOW = 0.5, 0.05, 0.95, 5
RUN_STATUS = "study_run.json"  # written next to metrics.jsonl when the subprocess ends


# ---------------------------------------------------------------------------------------------
# Collapse


@dataclass
class Collapse:
    collapsed: bool = False
    reasons: list[str] = field(default_factory=list)
    step: int | None = None  # the first step at which a rule fired

    def add(self, reason: str, step: int) -> None:
        self.collapsed = True
        self.reasons.append(reason)
        self.step = step if self.step is None else min(self.step, step)


def _num(value) -> float | None:
    """A metric value as a float (JSON writes NaN/inf as strings), None when absent."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def detect_collapse(rows: list[dict], *, max_completion_length: int, nonfinite_stop: bool = False,
                    drop: float = DROP, min_best: float = MIN_BEST, cap_frac: float = CAP_FRAC,
                    cap_window: int = CAP_WINDOW) -> Collapse:
    """Apply the three collapse rules (module docstring) to one run's metrics rows."""
    out = Collapse()
    last_step = max((int(r["step"]) for r in rows), default=0)
    if nonfinite_stop:
        out.add("non-finite stop", last_step)
    for r in rows:
        bad = [k for k in ("eval/pass@1", "loss/total", "reward/mean")
               if (v := _num(r.get(k))) is not None and not math.isfinite(v)]
        if bad:
            out.add(f"non-finite {bad[0]}", int(r["step"]))
            break
    evals = [(int(r["step"]), v) for r in rows if (v := _num(r.get("eval/pass@1"))) is not None and math.isfinite(v)]
    if evals:
        best_step, best = max(evals, key=lambda e: (e[1], -e[0]))  # earliest step among ties
        if best >= min_best:
            low = [(s, v) for s, v in evals if s > best_step and v < drop * best]
            if low:
                out.add(f"Pass@1 {best:.3f} (step {best_step}) -> {low[0][1]:.3f} (step {low[0][0]})", low[0][0])
    run = 0
    for r in rows:
        length = _num(r.get("completion/length_mean"))
        if length is None:
            continue
        run = run + 1 if length >= cap_frac * max_completion_length else 0
        if run >= cap_window:
            out.add(f"length at cap for {cap_window} steps", int(r["step"]))
            break
    return out


# ---------------------------------------------------------------------------------------------
# Running


def _status(run_dir: Path) -> dict:
    path = run_dir / RUN_STATUS
    return json.loads(path.read_text()) if path.exists() else {}


def is_complete(run_dir: Path, max_steps: int) -> bool:
    """Finished all steps, or stopped for good on non-finite updates (a collapse, not a crash)."""
    status = _status(run_dir)
    if status.get("nonfinite_stop"):
        return True
    steps = [int(r["step"]) for r in read_metrics(run_dir)]
    return status.get("returncode") == 0 and bool(steps) and max(steps) >= max_steps


def _command(spec: RunSpec, base: dict, run_dir: Path) -> list[str]:
    from sapo.checkpoint import list_checkpoints

    head = [sys.executable, "-m", "sapo", "train"]
    if list_checkpoints(run_dir):  # continue it; max_steps may have been raised since
        keep = {k: base[k] for k in ("max_steps", "eval_steps", "save_steps", "threads") if k in base}
        return head + [f"resume={run_dir}"] + [f"{k}={v}" for k, v in keep.items()] + [
            "progress=false", "tensorboard=false", "report=false",
            "trust_saved_rewards=true"]  # the study itself named these rewards when it started the run
    return head + [f"{k}={v}" for k, v in spec.overrides(base).items()] + [f"output_dir={run_dir}"]


def _run_one(spec: RunSpec, base: dict, run_dir: Path, env: dict) -> int:
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = _command(spec, base, run_dir)
    t0 = time.time()
    with open(run_dir / "study.log", "a") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            cwd=Path(__file__).resolve().parents[1]).returncode
    nonfinite = rc == EXIT_NONFINITE  # the trainer's own code for a stop on non-finite updates
    (run_dir / RUN_STATUS).write_text(json.dumps({"returncode": rc, "nonfinite_stop": nonfinite,
                                                  "seconds": round(time.time() - t0, 1)}))
    return rc


def run_study(grid: StudyGrid, out_dir: str | Path, *, jobs: int = 1, log=print) -> list[tuple[RunSpec, int | None]]:
    """Run every missing run of the grid; (spec, returncode or None when skipped) per run."""
    from sapo.config import build_config
    from sapo.training.warmstart import BUILTIN_MODELS, WarmStartRecipe, builtin_model_path

    out_dir = Path(out_dir)
    runs = grid.runs
    configs = {s.name: build_config(overrides=s.overrides(grid.base)) for s in runs}  # every typo fails now
    todo = [s for s in runs if not is_complete(out_dir / "runs" / s.name, configs[s.name].max_steps)]
    log(f"[compare] grid {grid.name}: {len(runs)} runs, {len(runs) - len(todo)} already done, {len(todo)} to run")
    # build each warm start once here, so parallel runs never build the same one twice
    import torch

    threads = grid.base.get("threads", "1")
    torch.set_num_threads(max(1, int(threads)))
    for model, recipe in dict.fromkeys((c.model, WarmStartRecipe.from_config(c)) for c in configs.values()):
        if model in BUILTIN_MODELS:
            builtin_model_path(model, recipe)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": threads,
           "MKL_NUM_THREADS": threads}
    results: list[tuple[RunSpec, int | None]] = [(s, None) for s in runs if s not in todo]

    def one(i_spec):
        i, spec = i_spec
        t0 = time.time()
        rc = _run_one(spec, grid.base, out_dir / "runs" / spec.name, env)
        log(f"[compare] {i + 1}/{len(todo)} {spec.name}: exit {rc} in {time.time() - t0:.0f} s")
        return spec, rc

    pool = ThreadPoolExecutor(max_workers=max(1, jobs))
    try:
        results += list(pool.map(one, enumerate(todo)))
    except KeyboardInterrupt:  # the running `sapo train`s got the SIGINT too and checkpoint; start no more
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    return results


# ---------------------------------------------------------------------------------------------
# Summary: one row per run, then per config over seeds

DIAGNOSTICS = {  # column -> metric key, averaged over a run's training steps
    "var_i": "log_ratio/seq_var_mean", "log_r_q01": "log_ratio/q01", "log_r_q99": "log_ratio/q99",
    "routing_changed": "moe/routing_changed", "gate_lt_0.5": "sapo/gate_lt_0.5_frac", "clip_frac": "clip/frac",
    "clip_seq_frac": "clip/seq_frac", "entropy": "entropy/mean", "gate_lt_0.5_pos": "sapo/gate_lt_0.5_frac_pos",
    "gate_lt_0.5_neg": "sapo/gate_lt_0.5_frac_neg", "cispo_capped": "cispo/capped_frac",
    "is_truncated": "is/truncated_frac", "rl_steps_behind": "async/staleness",
}


@dataclass
class RunResult:
    spec: RunSpec
    status: str  # done | collapsed | missing | partial | error
    collapse: Collapse
    rows: list[dict]
    evals: list[tuple[int, float]]  # (step, Pass@1)
    diagnostics: dict[str, float]

    def pass1(self, which: str) -> float | None:
        if not self.evals:
            return None
        values = [v for _, v in self.evals]
        return {"start": values[0], "best": max(values), "final": values[-1]}[which]


def load_result(spec: RunSpec, base: dict, out_dir: Path) -> RunResult:
    from sapo.config import build_config

    run_dir = out_dir / "runs" / spec.name
    cfg = build_config(overrides=spec.overrides(base))
    rows, status = read_metrics(run_dir), _status(run_dir)
    collapse = detect_collapse(rows, max_completion_length=cfg.max_completion_length,
                               nonfinite_stop=bool(status.get("nonfinite_stop")))
    if not rows:
        state = "missing" if not status else "error"
    elif collapse.collapsed:
        state = "collapsed"
    elif is_complete(run_dir, cfg.max_steps):
        state = "done"
    else:
        state = "error" if status.get("returncode") not in (None, 0) else "partial"
    evals = [(int(r["step"]), v) for r in rows if (v := _num(r.get("eval/pass@1"))) is not None and math.isfinite(v)]
    diagnostics = {}
    for column, key in DIAGNOSTICS.items():
        values = [v for r in rows if (v := _num(r.get(key))) is not None and math.isfinite(v)]
        if values:
            diagnostics[column] = sum(values) / len(values)
    return RunResult(spec, state, collapse, rows, evals, diagnostics)


def _config_key(s: RunSpec) -> tuple:
    return (s.part, *s.cell)


def group_results(grid: StudyGrid, out_dir: Path) -> dict[tuple, list[RunResult]]:
    """(part, label, model, mini-batches, lr, tau_pos, tau_neg, staleness, extra keys) -> its seeds' results."""
    cache: dict[str, RunResult] = {}
    groups: dict[tuple, list[RunResult]] = {}
    for spec in grid.specs:
        if spec.name not in cache:
            cache[spec.name] = load_result(spec, grid.base, out_dir)
        groups.setdefault(_config_key(spec), []).append(cache[spec.name])
    return groups


def _spread(values: list[float]) -> tuple[float, float, float] | None:
    return (sum(values) / len(values), min(values), max(values)) if values else None


TABLE_COLUMNS = ["part", "label", "model", "minibatches", "lr", "tau_pos", "tau_neg", "staleness", "extra", "seeds",
                 "finished",
                 "collapsed", "collapse_reasons", "pass1_start", "pass1_best", "pass1_best_min", "pass1_best_max",
                 "pass1_final", "pass1_final_min", "pass1_final_max", *DIAGNOSTICS]


def table_rows(groups: dict[tuple, list[RunResult]]) -> list[dict]:
    out = []
    for (part, *_), results in groups.items():
        spec = results[0].spec
        row = {"part": part, "label": spec.label, "model": spec.model.split(":")[-1], "minibatches": spec.num_minibatches,
               "lr": spec.lr, "tau_pos": spec.tau_pos, "tau_neg": spec.tau_neg, "staleness": spec.max_staleness,
               "extra": " ".join(f"{k}={v}" for k, v in spec.extra), "seeds": len(results),
               "finished": sum(r.status in ("done", "collapsed") for r in results),
               "collapsed": sum(r.collapse.collapsed for r in results),
               "collapse_reasons": "; ".join(f"s{r.spec.seed}: {', '.join(r.collapse.reasons)}"
                                             for r in results if r.collapse.collapsed)}
        for which in ("start", "best", "final"):
            spread = _spread([v for r in results if (v := r.pass1(which)) is not None])
            row[f"pass1_{which}"] = spread[0] if spread else None
            if which != "start":
                row[f"pass1_{which}_min"], row[f"pass1_{which}_max"] = (spread[1], spread[2]) if spread else (None,
                                                                                                             None)
        for column in DIAGNOSTICS:
            spread = _spread([r.diagnostics[column] for r in results if column in r.diagnostics])
            row[column] = spread[0] if spread else None
        out.append(row)
    return out


def frontier_rows(groups: dict[tuple, list[RunResult]]) -> list[dict]:
    """Per (objective, model, mini-batches): the largest lr whose seeds all finished without collapse."""
    by_objective: dict[tuple, list[tuple[float, list[RunResult]]]] = {}
    for (part, label, model, mb, lr, *_), results in groups.items():
        if part == "frontier":
            by_objective.setdefault((label, model, mb), []).append((lr, results))
    out = []
    for (label, model, mb), entries in by_objective.items():
        stable = [(lr, rs) for lr, rs in entries if all(r.status == "done" for r in rs)]
        unstable = sorted(lr for lr, rs in entries if any(r.collapse.collapsed for r in rs))
        best = None
        for lr, rs in stable:
            mean_best = _spread([v for r in rs if (v := r.pass1("best")) is not None])
            if mean_best and (best is None or mean_best[0] > best[1]):
                best = (lr, mean_best[0])
        out.append({"label": label, "model": model.split(":")[-1], "minibatches": mb,
                    "lrs": " ".join(f"{lr:.0e}" for lr, _ in sorted(entries, key=lambda e: e[0])),
                    "max_stable_lr": max((lr for lr, _ in stable), default=None),
                    "collapsed_lrs": " ".join(f"{lr:.0e}" for lr in unstable),
                    "best_pass1": best[1] if best else None, "best_pass1_lr": best[0] if best else None})
    return out


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2g}"
    return str(value)


def _markdown(rows: list[dict], columns: list[tuple[str, str]]) -> list[str]:
    lines = ["| " + " | ".join(title for _, title in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(row[key] if isinstance(row[key], str) else _fmt(row[key])
                                       for key, _ in columns) + " |")
    return lines


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows([{k: ("" if row.get(k) is None else row[k]) for k in columns} for row in rows])


def write_summary(grid: StudyGrid, out_dir: str | Path) -> Path:
    """table.md / table.csv / frontier.csv / runs.csv and plots/ from the runs' metrics."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = group_results(grid, out_dir)
    rows, frontier = table_rows(groups), frontier_rows(groups)
    _write_csv(out_dir / "table.csv", rows, TABLE_COLUMNS)
    _write_csv(out_dir / "frontier.csv", frontier, list(frontier[0]) if frontier else ["label"])
    runs = {r.spec.name: r for rs in groups.values() for r in rs}
    _write_csv(out_dir / "runs.csv", [
        {"run": n, "status": r.status, "seed": r.spec.seed, "collapse_step": r.collapse.step,
         "collapse_reasons": "; ".join(r.collapse.reasons), "pass1_start": r.pass1("start"),
         "pass1_best": r.pass1("best"), "pass1_final": r.pass1("final"), **r.diagnostics}
        for n, r in runs.items()], ["run", "status", "seed", "collapse_step", "collapse_reasons", "pass1_start",
                                    "pass1_best", "pass1_final", *DIAGNOSTICS])
    shown = []
    for row in rows:
        d = {**row, "lr": f"{row['lr']:.0e}", "seeds": f"{row['finished']}/{row['seeds']}",
             "collapsed": f"**{row['collapsed']}/{row['seeds']}**" if row["collapsed"] else "0"}
        for which in ("best", "final"):
            lo, hi = row[f"pass1_{which}_min"], row[f"pass1_{which}_max"]
            d[f"pass1_{which}"] = (f"{_fmt(row[f'pass1_{which}'])} [{_fmt(lo)}, {_fmt(hi)}]"
                                   if row[f"pass1_{which}"] is not None else "-")
        shown.append(d)
    title = "Off-policy study" if grid.offpolicy else "MoE stability study"
    lines = [f"# {title}: grid `{grid.name}`", "",
             f"{len(runs)} runs; per-run rows in runs.csv, this table in table.csv. Pass@1 = held-out avg@n; "
             "best/final: mean over seeds [min, max]. Diagnostics: mean over training steps and seeds. "
             f"Collapse: non-finite stop or value, held-out Pass@1 below {DROP:g} x its best (>= {MIN_BEST:g}) "
             f"after the best, or mean length >= {CAP_FRAC:g} x the cap for {CAP_WINDOW} steps "
             "(docs/moe_study.md).", "",
             "Shared: " + " ".join(f"`{k}={v}`" for k, v in grid.base.items() if k not in QUIET), "", "## Runs", ""]
    lines += _markdown(shown, [
        ("part", "part"), ("label", "objective"), ("model", "model"), ("minibatches", "mb"), ("lr", "lr"),
        ("staleness", "K"), ("seeds", "finished"), ("collapsed", "collapsed"), ("pass1_start", "Pass@1 step 0"),
        ("pass1_best", "best Pass@1"), ("pass1_final", "final Pass@1"), ("var_i", "Var_i"),
        ("log_r_q01", "log r q01"), ("log_r_q99", "log r q99"), ("routing_changed", "routing changed"),
        ("gate_lt_0.5", "gate<0.5"), ("clip_frac", "clip tok"), ("clip_seq_frac", "clip seq")])
    reasons = [f"- `{r['label']}` {r['model']} mb{r['minibatches']} lr {r['lr']:.0e}: {r['collapse_reasons']}"
               for r in rows if r["collapse_reasons"]]
    if reasons:
        lines += ["", "Collapsed runs:", "", *dict.fromkeys(reasons)]
    if frontier:
        lines += ["", "## Stability frontier", "",
                  "Largest lr of the grid at which every seed finished without collapse; best Pass@1 = the "
                  "highest seed-mean best Pass@1 over those stable lrs.", ""]
        lines += _markdown([{**f, "max_stable_lr": f"{f['max_stable_lr']:.0e}" if f["max_stable_lr"] else "none",
                             "best_pass1_lr": f"{f['best_pass1_lr']:.0e}" if f["best_pass1_lr"] else "-"}
                            for f in frontier],
                           [("label", "objective"), ("model", "model"), ("minibatches", "mb"), ("lrs", "lr grid"),
                            ("max_stable_lr", "largest stable lr"), ("collapsed_lrs", "collapsed at"),
                            ("best_pass1", "best Pass@1"), ("best_pass1_lr", "at lr")])
    from sapo.compare_plots import write_plots

    images = write_plots(groups, out_dir / "plots")
    if grid.offpolicy:
        from sapo.compare_offpolicy import (
            OFFPOLICY_COLUMNS,
            offpolicy_frontier,
            offpolicy_markdown,
            offpolicy_rows,
            write_offpolicy_plots,
        )

        cells = offpolicy_rows(groups)
        _write_csv(out_dir / "offpolicy.csv", cells, OFFPOLICY_COLUMNS)
        lines[2:2] = [*offpolicy_markdown(cells, offpolicy_frontier(cells)), ""]  # the study's answer first
        images += write_offpolicy_plots(cells, out_dir / "plots")
    if images:
        lines += ["", "## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in images]
    path = out_dir / "table.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sapo compare", description=__doc__.split("\n")[0])
    parser.add_argument("--grid", default=None, choices=GRIDS,
                        help="a named grid (default: `default`, the MoE study); see docs/offpolicy_study.md")
    parser.add_argument("--out", help="study folder (default: runs/moe-study-GRID, runs/offpolicy-GRID)")
    axes = parser.add_argument_group("a custom grid: the product of these axes (give --objectives to use it)")
    axes.add_argument("--objectives", help="comma-separated loss types, e.g. sapo,grpo,grpo_r2,gspo,cispo")
    axes.add_argument("--tau", default="1", help="SAPO tau_pos values (tau_neg = 1.05 tau_pos), e.g. 1,3,9")
    axes.add_argument("--tau-neg-ratio", type=float, default=1.05, help="tau_neg / tau_pos (default 1.05)")
    axes.add_argument("--staleness", default="0", help="max_staleness values (RL steps), e.g. 0,2,8")
    axes.add_argument("--lr", default="1e-4", help="learning rates, e.g. 5e-5,1e-4")
    axes.add_argument("--minibatches", default="4", help="num_minibatches values, e.g. 4,8")
    axes.add_argument("--seeds", default="0,1,2", help="seeds (default 0,1,2)")
    axes.add_argument("--steps", type=int, default=50, help="RL steps per run (default 50)")
    parser.add_argument("--part", help="only these parts of the grid (comma-separated, as --list names them), e.g. "
                        "--grid offpolicy-full --part norm_lr_scale=1")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1; each uses threads=1)")
    parser.add_argument("--summary-only", action="store_true", help="rebuild the table and plots, run nothing")
    parser.add_argument("--list", action="store_true", help="print the runs of the grid and exit")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    if args.objectives and args.grid:
        parser.error("give either --grid or the axes of a custom grid (--objectives ...), not both")
    try:
        grid = (custom_grid(objectives=args.objectives, taus=args.tau, staleness=args.staleness, lrs=args.lr,
                            minibatches=args.minibatches, seeds=args.seeds, steps=args.steps,
                            tau_neg_ratio=args.tau_neg_ratio)
                if args.objectives else make_grid(args.grid or "default"))
    except ValueError as e:
        parser.error(str(e))
    if args.part:
        parts = [p.strip() for p in args.part.split(",") if p.strip()]
        known = list(dict.fromkeys(spec.part for spec in grid.specs))
        if not parts or set(parts) - set(known):
            parser.error(f"--part {args.part!r}: grid {grid.name!r} has the parts {', '.join(known)}")
        grid = replace(grid, specs=[spec for spec in grid.specs if spec.part in parts])
    prefix = "offpolicy-" if grid.offpolicy and not grid.name.startswith("offpolicy") else ""
    out = Path(args.out or (f"runs/{prefix}{grid.name}" if grid.offpolicy else f"runs/moe-study-{grid.name}"))
    if args.list:
        for spec in grid.runs:
            print(f"{spec.name:60s} {spec.part}: {spec.label}")
        print(f"{len(grid.runs)} runs x {grid.base['max_steps']} steps")
        return 0
    if not args.summary_only:
        try:
            run_study(grid, out, jobs=args.jobs)
        except KeyboardInterrupt:
            print("[compare] interrupted; run the same command again to continue", file=sys.stderr)
            return 130
    print(write_summary(grid, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
