"""Plots of the MoE stability study (`sapo compare`): Pass@1 curves, the frontier, tau, dense vs MoE."""

from __future__ import annotations

import math
from pathlib import Path

from sapo.compare import RunResult, _num, _spread


def _curve(results: list[RunResult], key: str | None = None) -> tuple[list[int], list[float], list[float],
                                                                       list[float]]:
    """Mean, min, max over seeds at each step (Pass@1 by default, else the metric `key`)."""
    per_step: dict[int, list[float]] = {}
    for r in results:
        points = r.evals if key is None else [(int(row["step"]), v) for row in r.rows
                                               if (v := _num(row.get(key))) is not None and math.isfinite(v)]
        for step, v in points:
            per_step.setdefault(step, []).append(v)
    steps = sorted(per_step)
    return (steps, [sum(per_step[s]) / len(per_step[s]) for s in steps], [min(per_step[s]) for s in steps],
            [max(per_step[s]) for s in steps])


def _panel_curves(ax, curves: dict[str, list[RunResult]], title: str, key: str | None = None) -> None:
    for label, results in curves.items():
        steps, mean, lo, hi = _curve(results, key)
        if not steps:
            continue
        collapsed = sum(r.collapse.collapsed for r in results)
        tag = f" ({collapsed}/{len(results)} collapsed)" if collapsed else ""
        line, = ax.plot(steps, mean, marker="o", ms=3, label=f"{label}{tag}")
        if len(results) > 1:
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def save_figure(fig, plots: Path, stem: str, saved: list[Path]) -> None:
    """plots/STEM.png at the studies' resolution; the figure is closed and its path appended to `saved`."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(plots / f"{stem}.png", dpi=110)
    plt.close(fig)
    saved.append(plots / f"{stem}.png")


def write_plots(groups: dict[tuple, list[RunResult]], plots: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots.mkdir(parents=True, exist_ok=True)
    saved: list[Path] = []

    def save(fig, stem: str) -> None:
        save_figure(fig, plots, stem, saved)

    def select(part: str) -> dict[tuple, list[RunResult]]:
        return {k: v for k, v in groups.items() if k[0] == part}

    objectives = select("objectives")  # Pass@1 over steps, one panel per mini-batch count
    mbs = sorted({k[3] for k in objectives})
    if mbs:
        fig, axes = plt.subplots(1, len(mbs), figsize=(5.5 * len(mbs), 3.6), squeeze=False)
        for ax, mb in zip(axes[0], mbs):
            curves = {k[1]: v for k, v in objectives.items() if k[3] == mb}
            lr = next(k[4] for k in objectives if k[3] == mb)
            _panel_curves(ax, curves, f"held-out Pass@1, {mb} mini-batches/rollout, lr {lr:.0e} "
                          "(mean, min-max over seeds)")
        save(fig, "pass_at_1")
    frontier = select("frontier")
    if frontier:
        mbs = sorted({k[3] for k in frontier})
        fig, axes = plt.subplots(1, len(mbs), figsize=(5.5 * len(mbs), 3.6), squeeze=False)
        for ax, mb in zip(axes[0], mbs):
            for label in dict.fromkeys(k[1] for k in frontier if k[3] == mb):
                points = sorted((k[4], v) for k, v in frontier.items() if k[1] == label and k[3] == mb)
                lrs = [lr for lr, _ in points]
                final = [_spread([b for r in rs if (b := r.pass1("final")) is not None]) for _, rs in points]
                ys = [b[0] if b else math.nan for b in final]
                line, = ax.plot(lrs, ys, marker="o", label=label)
                bad = [(lr, y) for (lr, rs), y in zip(points, ys) if any(r.collapse.collapsed for r in rs)]
                if bad:
                    ax.scatter(*zip(*bad), marker="x", s=80, color=line.get_color())
            starts = [v for k, rs in frontier.items() if k[3] == mb for r in rs if (v := r.pass1("start")) is not None]
            if starts:
                ax.axhline(sum(starts) / len(starts), color="gray", ls=":", label="step 0")
            ax.set_xscale("log")
            ax.set_xlabel("learning rate")
            ax.set_ylabel("final held-out Pass@1 (seed mean)")
            ax.set_title(f"stability frontier, {mb} mini-batches (x: a seed collapsed)", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        save(fig, "frontier")
    for part, stem, title in (("tau_neg", "tau_neg", "tau_neg ablation (tau_pos = 1)"),
                              ("tau", "tau_sweep", "tau sweep (tau_pos = tau_neg = tau)")):
        chosen = select(part)
        if chosen:
            fig, ax = plt.subplots(figsize=(6, 3.6))
            _panel_curves(ax, {k[1]: v for k, v in chosen.items()}, f"held-out Pass@1, {title}")
            save(fig, stem)
    dense = select("dense_vs_moe")
    if dense:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
        by_model = {f"{k[1]} {k[2].split(':')[-1]}": v for k, v in dense.items()}
        _panel_curves(axes[0], by_model, "in-sequence variance Var_i of log r (mean over sequences)",
                      key="log_ratio/seq_var_mean")
        levels = ["q01", "q10", "q50", "q90", "q99"]
        for label, results in by_model.items():
            means = [_spread([m for r in results if (m := _mean_metric(r, f"log_ratio/{q}")) is not None])
                     for q in levels]
            axes[1].plot([int(q[1:]) for q in levels], [m[0] if m else math.nan for m in means], marker="o",
                         label=label)
        axes[1].set_xlabel("quantile (%)")
        axes[1].set_ylabel("token log r (mean over steps)")
        axes[1].set_title("token log-ratio distribution, dense vs MoE", fontsize=9)
        axes[1].grid(alpha=0.3)
        axes[1].legend(fontsize=7)
        save(fig, "dense_vs_moe")
    return saved


def _mean_metric(result: RunResult, key: str) -> float | None:
    values = [v for row in result.rows if (v := _num(row.get(key))) is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


