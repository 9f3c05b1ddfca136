"""The run report: report.md with plots of reward, Pass@1, ratio spread, SAPO gate and entropy."""

from __future__ import annotations

import math
import re
from pathlib import Path

from sapo.tracking import read_metrics

_TEMP_KEY = re.compile(r"eval/pass@1_T([0-9.eE+-]+)")

PANELS = [
    # (file stem, title, [(metric key, label)])
    ("reward", "Training reward", [("reward/mean", "reward mean")]),
    ("pass_at_1", "Held-out accuracy", [("eval/pass@1", "Pass@1 (avg@n)"), ("eval/greedy", "greedy"),
                                        ("eval/pass@8", "pass@8")]),
    ("ratio", "Importance ratio r = pi_theta / pi_old",
     [("ratio/max", "max"), ("ratio/min", "min"), ("ratio/mean", "mean")]),
    ("log_ratio", "Token log-ratio quantiles and in-sequence variance",
     [("log_ratio/q01", "q01"), ("log_ratio/q50", "q50"), ("log_ratio/q99", "q99"),
      ("log_ratio/seq_var_mean", "Var_i mean")]),
    ("sapo_gate", "SAPO soft gate w = sech^2(tau (r - 1) / 2)",
     [("sapo/gate_mean_pos", "mean w, A > 0"), ("sapo/gate_mean_neg", "mean w, A <= 0"),
      ("sapo/gate_lt_0.5_frac", "share w < 0.5")]),
    ("staleness", "Asynchronous rollouts: lag and waits",
     [("async/staleness", "RL steps behind (batch)"), ("async/trainer_wait_s", "trainer waited (s)"),
      ("async/sampler_wait_s", "sampler waited (s)"), ("async/sync_s", "weight hand-over (s)")]),
    ("sampler_correction", "Importance weights against the sampler (tis_cap)",
     [("is/weight_mean", "mean weight"), ("is/truncated_frac", "truncated share"), ("is/masked_frac", "masked share"),
      ("mismatch/abs_log_ratio_mean", "|log pi_old - log pi_sampler|")]),
    ("clipping", "Clipped share (GRPO tokens / GSPO sequences)",
     [("clip/frac", "tokens"), ("clip/seq_frac", "sequences"), ("cispo/capped_frac", "CISPO capped")]),
    ("entropy", "Policy entropy (nats / token)", [("entropy/mean", "entropy")]),
    ("length", "Completion length (tokens)", [("completion/length_mean", "mean"),
                                              ("completion/truncated_frac", "truncated share")]),
    ("moe", "MoE routing", [("moe/routing_changed", "routing changed share"),
                            ("moe/expert_load_entropy", "expert load entropy"),
                            ("moe/replay_mismatch", "replay mismatch share (0 = replay took effect)")]),
]


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            xs.append(int(row["step"]))
            ys.append(float(value))
    return xs, ys


def write_report(output_dir: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    rows = read_metrics(output_dir)
    plots = output_dir / "plots"
    plots.mkdir(exist_ok=True)
    images = []
    for stem, title, series in PANELS:
        present = [(k, lbl, *_series(rows, k)) for k, lbl in series]
        present = [p for p in present if p[2]]
        if not present:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.4))
        for _, label, xs, ys in present:
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = plots / f"{stem}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        images.append((title, path.relative_to(output_dir)))

    curves = temperature_curves(rows)
    if curves:
        images.append(("Pass@1 against sampling temperature", _plot_temperature(curves, plots).relative_to(output_dir)))

    evals = [r for r in rows if "eval/pass@1" in r]
    lines = [f"# Run report: {output_dir.name}", ""]
    config = output_dir / "config.yaml"
    if config.exists():
        lines += ["Config: [config.yaml](config.yaml). Metrics: [metrics.jsonl](metrics.jsonl).", ""]
    if evals:
        first, last = evals[0], evals[-1]
        best = max(evals, key=lambda r: r["eval/pass@1"])
        lines += [
            "## Held-out evaluation",
            "",
            f"{int(first.get('eval/num_problems', 0))} problems x {int(first.get('eval/num_samples', 0))} samples.",
            "",
            "| step | Pass@1 (avg@n) | greedy | pass@8 |",
            "|---:|---:|---:|---:|",
        ]
        for r in evals:
            lines.append(f"| {r['step']} | {r['eval/pass@1']:.3f} | {_fmt(r.get('eval/greedy'))} | "
                         f"{_fmt(r.get('eval/pass@8'))} |")
        lines += ["", f"Pass@1 went from {first['eval/pass@1']:.3f} (step {first['step']}) to "
                  f"{last['eval/pass@1']:.3f} (step {last['step']}); best {best['eval/pass@1']:.3f} "
                  f"at step {best['step']}.", ""]
    if curves:
        temps = sorted({t for _, curve, _ in curves for t in curve})
        lines += ["## Pass@1 against temperature", "",
                  "| policy | " + " | ".join(f"T = {t:g}" for t in temps) + " | best | greedy |",
                  "|---|" + "---:|" * (len(temps) + 2)]
        for label, curve, greedy in curves:
            best_t = max(curve, key=curve.get)
            lines.append(f"| {label} | " + " | ".join(_fmt(curve.get(t)) for t in temps)
                         + f" | {curve[best_t]:.3f} (T = {best_t:g}) | {_fmt(greedy)} |")
        if len(curves) == 2:
            (_, start, _), (_, end, _) = curves
            common = [t for t in start if t in end]
            if common:
                best_t = max(common, key=start.get)
                lines += ["", f"At the starting policy's best temperature (T = {best_t:g}) Pass@1 went from "
                          f"{start[best_t]:.3f} to {end[best_t]:.3f} ({100 * (end[best_t] - start[best_t]):+.1f} "
                          "points; a change at a fixed temperature, so not a change of sharpness alone)."]
        lines.append("")
    train_rows = [r for r in rows if "reward/mean" in r]
    if train_rows:
        gate_keys = ["sapo/gate_mean", "sapo/gate_mean_pos", "sapo/gate_mean_neg", "sapo/gate_lt_0.5_frac",
                     "ratio/min", "ratio/max", "log_ratio/seq_var_mean", "clip/frac", "clip/seq_frac",
                     "moe/routing_changed", "moe/replay_mismatch", "entropy/mean", "async/staleness",
                     "async/trainer_wait_s", "is/weight_mean"]
        lines += ["## Objective diagnostics (mean over steps)", "", "| metric | mean | last |", "|---|---:|---:|"]
        for key in gate_keys:
            _, ys = _series(train_rows, key)
            if ys:
                lines.append(f"| `{key}` | {sum(ys) / len(ys):.4g} | {ys[-1]:.4g} |")
        times = [r.get("time/step", 0.0) for r in train_rows]
        lines += ["", f"{len(train_rows)} steps, {sum(times):.0f} s of training steps "
                  f"({sum(times) / len(times):.2f} s/step).", ""]
    if images:
        lines += ["## Plots", ""]
        for title, path in images:
            lines += [f"### {title}", "", f"![{title}]({path.as_posix()})", ""]
    report = output_dir / "report.md"
    report.write_text("\n".join(lines))
    return report


def temperature_curves(rows: list[dict]) -> list[tuple[str, dict[float, float], float | None]]:
    """(label, {temperature: Pass@1}, greedy) of the first and the last rows with eval/pass@1_T<t> keys
    (the starting and the final policy), or of the one such row."""
    swept = []
    for row in rows:
        curve = {}
        for key, value in row.items():
            match = _TEMP_KEY.fullmatch(key)
            if match and isinstance(value, int | float) and math.isfinite(value):
                curve[float(match.group(1))] = float(value)
        if curve:
            swept.append((row, curve))
    if not swept:
        return []
    chosen = [swept[0]] if len(swept) == 1 else [swept[0], swept[-1]]
    return [(f"step {int(row['step'])}" + (" (start)" if i == 0 else " (final)"), dict(sorted(curve.items())),
             row.get("eval/greedy")) for i, (row, curve) in enumerate(chosen)]


def _plot_temperature(curves, plots: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4))
    for label, curve, greedy in curves:
        line = ax.plot(list(curve), list(curve.values()), marker="o", ms=4, label=f"{label}, Pass@1")[0]
        if isinstance(greedy, int | float):
            ax.axhline(greedy, color=line.get_color(), ls="--", lw=1, label=f"{label}, greedy")
    ax.set_title("Held-out Pass@1 against sampling temperature", fontsize=10)
    ax.set_xlabel("temperature")
    ax.set_ylabel("Pass@1 (avg@n)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = plots / "pass_at_1_temperature.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) else "-"
