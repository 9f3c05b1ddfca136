"""The README's headline table: the built-in default over several seeds, with SFT for the same time beside it.

For each seed: `sapo train seed=S` (the built-in default, nothing else changed unless given after --),
then `bench/sft_vs_rl.py`'s comparison on the same warm start (supervised training on the same
demonstrations for the RL run's step time). Prints one table: greedy accuracy, Pass@1 at T = 1, Pass@1
at the warm start's best temperature (of `eval_temperatures`) and pass@8, at step 0 and at the end,
the SFT column, and whether each of the demo's targets holds (greedy +10 points, Pass@1 at T = 1 +20,
best-T +10 over the warm start's best, RL ahead of SFT on greedy). A finished seed is not run again.

`--also-eval SPEC` evaluates the warm start and the final policy on another held-out set as well (greedy,
Pass@1 at T = 1): whether RL kept the rest of the task while it learnt the part the demo measures.

    python bench/demo_seeds.py                         # seeds 0 1 2 into runs/demo-seeds/
    python bench/demo_seeds.py --seeds 0 -- max_steps=60
    python bench/demo_seeds.py --out runs/vl-seeds --sft-threads 1 --also-eval builtin:vl-digits \
        -- --config configs/vl-digits.yaml
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

TARGETS = {"greedy": 0.10, "t1": 0.20, "best_t": 0.10}


def _finished(run: Path) -> bool:
    from sapo.tracking import read_metrics

    return (run / "final_model").exists() and any("eval/pass@1" in r for r in read_metrics(run))


def seed_row(run: Path) -> dict:
    """Step-0 and final figures of one RL run (and its SFT comparison when present)."""
    from sapo.tracking import read_metrics

    rows = read_metrics(run)
    evals = [r for r in rows if "eval/pass@1" in r]
    start, end = evals[0], evals[-1]
    temps = sorted((k for k in start if k.startswith("eval/pass@1_T") and k in end),
                   key=lambda k: float(k.removeprefix("eval/pass@1_T")))
    best_key = max(temps, key=lambda k: start[k]) if temps else "eval/pass@1"
    t1 = "eval/pass@1_T1" if "eval/pass@1_T1" in start else "eval/pass@1"
    row = {"run": str(run), "greedy": (start.get("eval/greedy"), end.get("eval/greedy")),
           "t1": (start[t1], end[t1]), "best_t": (start[best_key], end[best_key]),
           "best_t_name": best_key.removeprefix("eval/pass@1_T"),
           "pass8": (start.get("eval/pass@8"), end.get("eval/pass@8")),
           "seconds": sum(r.get("time/step", 0.0) for r in rows)}
    sft_file = run / "sft_vs_rl.json"
    if sft_file.exists():
        sft = json.loads(sft_file.read_text())
        row["sft"] = {k: v["sft"] for k, v in sft.items() if isinstance(v, dict)}
        row["sft_steps"], row["sft_seconds"] = sft["sft_steps"], sft["sft_seconds"]
    return row


def also_eval(run: Path, spec: str, num_problems: int = 200) -> dict:
    """Greedy and Pass@1 (T = 1, 4 samples) of the warm start and of the final policy on `spec`'s held-out
    problems (written to RUN/also_eval.json; reused when it names the same spec)."""
    from sapo.config import build_config
    from sapo.evaluate import run_eval

    out_file = run / "also_eval.json"
    saved = json.loads(out_file.read_text()) if out_file.exists() else {}
    if saved.get("spec") == spec:
        return saved
    out = {"spec": spec}
    for name, model in (("warm_start", None), ("rl", str(run / "final_model"))):
        overrides = {"output_dir": str(run), "resume": "", "eval_dataset": spec, "dataset": spec,
                     "eval_num_problems": str(num_problems), "eval_num_samples": "4", "eval_pass_k": "[1]",
                     "eval_temperatures": "[]", "eval_temperature": "1.0", "progress": "false"}
        if model:
            overrides["model"] = model
        metrics = run_eval(build_config(run / "config.yaml", overrides))
        prefix = "eval/" + spec.split(":", 1)[0]
        out[name] = {"greedy": metrics[f"{prefix}/greedy"], "pass@1": metrics[f"{prefix}/pass@1"],
                     "num_problems": metrics[f"{prefix}/num_problems"]}
    out_file.write_text(json.dumps(out, indent=1))
    return out


def checks(row: dict) -> dict[str, bool]:
    out = {name: (row[name][1] - row[name][0]) >= goal - 1e-9
           for name, goal in TARGETS.items() if None not in row[name]}
    if "sft" in row and "eval/greedy" in row["sft"] and row["greedy"][1] is not None:
        out["rl_over_sft"] = row["greedy"][1] > row["sft"]["eval/greedy"]
    return out


def table(rows: dict[int, dict]) -> list[str]:
    def pair(p):
        return "-" if None in p else f"{p[0]:.3f} -> {p[1]:.3f} ({p[1] - p[0]:+.3f})"

    also = next((row["also"]["spec"] for row in rows.values() if "also" in row), None)
    lines = ["| seed | greedy | Pass@1 T = 1 | Pass@1 at the warm start's best T | pass@8 | SFT same time: greedy / T = 1 "
             "(steps, s) | targets |" + (f" {also}: greedy / Pass@1 T = 1 |" if also else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if also else "")]
    for seed, row in rows.items():
        sft = row.get("sft", {})
        sft_text = (f"{sft['eval/greedy']:.3f} / {sft.get('eval/pass@1_T1', sft.get('eval/pass@1')):.3f} "
                    f"({row['sft_steps']}, {row['sft_seconds']:.0f})" if "eval/greedy" in sft else "-")
        ok = checks(row)
        verdict = "all met" if ok and all(ok.values()) else ", ".join(f"{k} missed" for k, v in ok.items() if not v)
        lines.append(f"| {seed} | {pair(row['greedy'])} | {pair(row['t1'])} | {pair(row['best_t'])} "
                     f"(T = {row['best_t_name']}) | {pair(row['pass8'])} | {sft_text} | {verdict} |"
                     + (f" {_also_text(row.get('also'))} |" if also else ""))
    return lines


def _also_text(also: dict | None) -> str:
    if not also:
        return "-"
    a, b = also["warm_start"], also["rl"]
    return (f"{a['greedy']:.3f} -> {b['greedy']:.3f} ({b['greedy'] - a['greedy']:+.3f}) / "
            f"{a['pass@1']:.3f} -> {b['pass@1']:.3f} ({int(a['num_problems'])} problems)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/demo-seeds")
    parser.add_argument("--no-sft", action="store_true", help="skip the SFT comparison")
    parser.add_argument("--sft-seconds", type=float, default=0.0,
                        help="SFT time budget (default: each RL run's own step time; give the idle machine's RL "
                        "time when the RL runs shared the machine)")
    parser.add_argument("--sft-threads", type=int, default=0, help="torch threads for SFT (0: torch's default, "
                        "as the default run's threads=0)")
    parser.add_argument("--also-eval", default="", metavar="SPEC",
                        help="also evaluate the warm start and the final policy on SPEC's held-out problems "
                        "(e.g. builtin:vl-digits: the whole task, beside the part the demo measures)")
    parser.add_argument("overrides", nargs="*", help="key=value given to every `sapo train` (after --)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    rows = {}
    for seed in args.seeds:
        run = out / f"seed-{seed}"
        if not _finished(run):
            cmd = [sys.executable, "-m", "sapo", "train", f"seed={seed}", f"output_dir={run}", "progress=false",
                   *args.overrides]
            print("[demo]", " ".join(cmd), flush=True)
            t0 = time.time()
            subprocess.run(cmd, check=True, cwd=ROOT)
            print(f"[demo] seed {seed}: {time.time() - t0:.0f} s", flush=True)
        if not args.no_sft and not (run / "sft_vs_rl.json").exists():
            import torch
            from sft_vs_rl import sft_same_time

            sft_same_time(run, threads=args.sft_threads or torch.get_num_threads(), seconds=args.sft_seconds)
        rows[seed] = seed_row(run)
        if args.also_eval:
            rows[seed]["also"] = also_eval(run, args.also_eval)
    print()
    print("\n".join(table(rows)))
    (out / "table.md").write_text("\n".join(table(rows)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
