"""The off-policy study's view of a grid: one row per config (objective, tau, staleness, lr) over its seeds,
each objective's stability frontier in lr and in staleness, and the plots against staleness.

A config asked for by two parts of the grid (K = 0 at the working lr is in the lr frontier and in the
staleness sweep) is one row here. Pass@1 is the final held-out Pass@1 (avg@n), mean [min, max] over seeds;
a collapsed seed counts with whatever it ended at, so collapse shows both in the count and in the mean.
"""

from __future__ import annotations

import math
from pathlib import Path

from sapo.compare import RunResult, _fmt, _spread
from sapo.compare_grids import TAU_NEG_RATIO, WORKING_LR

OFFPOLICY_COLUMNS = ["objective", "tau", "staleness", "lr", "extra", "seeds", "finished", "collapsed", "pass1_start",
                     "pass1_final", "pass1_final_min", "pass1_final_max", "pass1_best", "gate_lt_0.5_pos",
                     "gate_lt_0.5_neg", "clip_frac", "clip_seq_frac", "is_truncated", "collapse_reasons"]


def _tau_text(spec) -> str:
    if spec.loss_type != "sapo":
        return "-"
    ratio = spec.tau_neg / spec.tau_pos
    tail = "" if math.isclose(ratio, TAU_NEG_RATIO, rel_tol=1e-6) else f" (tau_neg={spec.tau_neg:g})"
    return f"tau={spec.tau_pos:g}{tail}"


def _row_key(spec) -> tuple:
    """Table order: objective, then tau, the tau_neg ratio, extra keys, staleness, lr."""
    order = {"sapo": 0, "grpo": 1, "grpo_r2": 2, "gspo": 3, "cispo": 4}
    return (order.get(spec.loss_type, 9), spec.loss_type, spec.tau_pos, spec.tau_neg / spec.tau_pos, spec.extra,
            spec.max_staleness, spec.lr)


def offpolicy_rows(groups: dict[tuple, list[RunResult]]) -> list[dict]:
    cells: dict[tuple, list[RunResult]] = {}
    for results in groups.values():
        for r in results:
            cell = cells.setdefault(r.spec.cell, [])
            if all(x.spec.name != r.spec.name for x in cell):
                cell.append(r)
    out = []
    for results in sorted(cells.values(), key=lambda rs: _row_key(rs[0].spec)):
        spec = results[0].spec
        extra = {k: v for k, v in spec.extra if k not in ("old_logprobs", "tis_cap")}  # the objective's own keys
        row = {"objective": spec.loss_type, "label": spec.label, "tau": _tau_text(spec), "tau_pos": spec.tau_pos,
               "tau_neg": spec.tau_neg, "staleness": spec.max_staleness, "lr": spec.lr,
               "extra": " ".join(f"{k}={v}" for k, v in extra.items()), "seeds": len(results),
               "finished": sum(r.status in ("done", "collapsed") for r in results),
               "collapsed": sum(r.collapse.collapsed for r in results),
               "collapse_reasons": "; ".join(f"s{r.spec.seed}: {', '.join(r.collapse.reasons)}"
                                             for r in results if r.collapse.collapsed)}
        start = _spread([v for r in results if (v := r.pass1("start")) is not None])
        final = _spread([v for r in results if (v := r.pass1("final")) is not None])
        best = _spread([v for r in results if (v := r.pass1("best")) is not None])
        row["pass1_start"] = start[0] if start else None
        row["pass1_final"], row["pass1_final_min"], row["pass1_final_max"] = final or (None, None, None)
        row["pass1_best"] = best[0] if best else None
        for key in ("gate_lt_0.5_pos", "gate_lt_0.5_neg", "clip_frac", "clip_seq_frac", "cispo_capped", "is_truncated"):
            spread = _spread([r.diagnostics[key] for r in results if key in r.diagnostics])
            row[key] = spread[0] if spread else None
        capped = row.pop("cispo_capped")
        if row["clip_frac"] is None:  # CISPO caps its weights instead of clipping: the same column
            row["clip_frac"] = capped
        row["runs"] = results
        out.append(row)
    return out


def _stable(row: dict) -> bool:
    return row["collapsed"] == 0 and all(r.status == "done" for r in row["runs"])


def offpolicy_frontier(rows: list[dict]) -> list[dict]:
    """Per objective row label (extra keys apart): the largest stable lr at K = 0 and the largest stable
    staleness at the working lr, each with where it collapsed. None: not stable at any tested value."""
    by_label: dict[tuple, list[dict]] = {}
    for row in rows:
        by_label.setdefault((row["label"], row["extra"]), []).append(row)
    out = []
    for (label, extra), entries in by_label.items():
        lr_rows = [r for r in entries if r["staleness"] == 0]
        k_rows = [r for r in entries if math.isclose(r["lr"], WORKING_LR)]
        out.append({
            "label": label + (f" {extra}" if extra else ""),
            "lrs": " ".join(f"{r['lr']:.0e}" for r in sorted(lr_rows, key=lambda r: r["lr"])),
            "max_stable_lr": max((r["lr"] for r in lr_rows if _stable(r)), default=None),
            "collapsed_lrs": " ".join(f"{r['lr']:.0e} ({r['collapsed']}/{r['seeds']})"
                                      for r in sorted(lr_rows, key=lambda r: r["lr"]) if r["collapsed"]),
            "ks": " ".join(str(r["staleness"]) for r in sorted(k_rows, key=lambda r: r["staleness"])),
            "max_stable_k": max((r["staleness"] for r in k_rows if _stable(r)), default=None),
            "collapsed_ks": " ".join(f"{r['staleness']} ({r['collapsed']}/{r['seeds']})"
                                     for r in sorted(k_rows, key=lambda r: r["staleness"]) if r["collapsed"])})
    return out


def _cell(row: dict, key: str) -> str:
    mean, lo, hi = row[key], row[f"{key}_min"], row[f"{key}_max"]
    return "-" if mean is None else f"{_fmt(mean)} [{_fmt(lo)}, {_fmt(hi)}]"


def offpolicy_markdown(rows: list[dict], frontier: list[dict]) -> list[str]:
    """The table in the form bench/RESULTS.md uses, the gate statistics, and the frontier."""
    lines = ["## Off-policy view", "",
             "Final held-out Pass@1, mean [min, max] over seeds; collapsed n/N seeds. `staleness=K`: the batch "
             "of step t was sampled with the weights after step t-1-K.", "",
             "| objective | tau | staleness | lr | final Pass@1 mean [min, max] | collapsed |", "|---|---|---|---|---|---|"]
    for r in rows:
        objective = r["objective"] + (f" ({r['extra']})" if r["extra"] else "")
        pending = "" if r["finished"] == r["seeds"] else f" ({r['finished']} finished)"
        lines.append(f"| {objective} | {r['tau']} | staleness={r['staleness']} | {r['lr']:.0e} | "
                     f"{_cell(r, 'pass1_final')} | {r['collapsed']}/{r['seeds']}{pending} |")
    lines += ["", "What the gate and the clips did (means over training steps and seeds): share of tokens with "
              "SAPO gate w < 0.5 for A > 0 and A <= 0, GRPO-type clipped tokens (CISPO: capped weights), GSPO clipped sequences, "
              "share of tokens whose truncated IS weight hit its cap (GRPO-R2).", "",
              "| objective | tau | staleness | lr | w<0.5, A>0 | w<0.5, A<=0 | clipped tokens | clipped seqs | IS capped |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        objective = r["objective"] + (f" ({r['extra']})" if r["extra"] else "")
        lines.append(f"| {objective} | {r['tau']} | {r['staleness']} | {r['lr']:.0e} | {_fmt(r['gate_lt_0.5_pos'])} | "
                     f"{_fmt(r['gate_lt_0.5_neg'])} | {_fmt(r['clip_frac'])} | {_fmt(r['clip_seq_frac'])} | "
                     f"{_fmt(r['is_truncated'])} |")
    lines += ["", "## Off-policy stability frontier", "",
              f"Largest lr at staleness 0, and largest staleness at lr {WORKING_LR:.0e}, at which every seed "
              "finished without collapse (none: no tested value was stable).", "",
              "| objective | lrs tested | largest stable lr | collapsed at lr | staleness tested | "
              "largest stable staleness | collapsed at staleness |", "|---|---|---|---|---|---|---|"]
    for f in frontier:
        lr = "none" if f["max_stable_lr"] is None else f"{f['max_stable_lr']:.0e}"
        k = "none" if f["max_stable_k"] is None else str(f["max_stable_k"])
        lines.append(f"| {f['label']} | {f['lrs'] or '-'} | {lr if f['lrs'] else '-'} | {f['collapsed_lrs'] or '-'} | "
                     f"{f['ks'] or '-'} | {k if f['ks'] else '-'} | {f['collapsed_ks'] or '-'} |")
    reasons = [f"- {r['label']} staleness={r['staleness']} lr {r['lr']:.0e}: {r['collapse_reasons']}"
               for r in rows if r["collapse_reasons"]]
    if reasons:
        lines += ["", "Collapsed runs:", "", *reasons]
    return lines


def write_offpolicy_plots(rows: list[dict], plots: Path) -> list[Path]:
    """staleness.png (final Pass@1 against K per objective) and gate_vs_staleness.png (SAPO's w < 0.5 by sign)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sapo.compare_plots import save_figure

    plots.mkdir(parents=True, exist_ok=True)
    at_lr = [r for r in rows if math.isclose(r["lr"], WORKING_LR) and not r["extra"]]
    by_label: dict[str, list[dict]] = {}
    for r in at_lr:
        by_label.setdefault(r["label"], []).append(r)
    saved = []
    if any(len(v) > 1 for v in by_label.values()):
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, entries in by_label.items():
            entries = sorted(entries, key=lambda r: r["staleness"])
            ks = [r["staleness"] for r in entries]
            ys = [r["pass1_final"] if r["pass1_final"] is not None else math.nan for r in entries]
            lo = [y - (r["pass1_final_min"] if r["pass1_final_min"] is not None else y) for y, r in zip(ys, entries)]
            hi = [(r["pass1_final_max"] if r["pass1_final_max"] is not None else y) - y for y, r in zip(ys, entries)]
            line = ax.errorbar(ks, ys, yerr=[lo, hi], marker="o", ms=4, capsize=3, label=label)
            bad = [(k, y) for k, y, r in zip(ks, ys, entries) if r["collapsed"]]
            if bad:
                ax.scatter(*zip(*bad), marker="x", s=90, color=line.lines[0].get_color(), zorder=3)
        starts = [r["pass1_start"] for r in at_lr if r["pass1_start"] is not None]
        if starts:
            ax.axhline(sum(starts) / len(starts), color="gray", ls=":", label="step 0")
        ax.set_xlabel("staleness K (RL steps the sampler lags)")
        ax.set_ylabel("final held-out Pass@1 (mean, min-max)")
        ax.set_title(f"Pass@1 against staleness at lr {WORKING_LR:.0e} (x: a seed collapsed)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        save_figure(fig, plots, "staleness", saved)
    sapo_rows = {label: sorted(v, key=lambda r: r["staleness"]) for label, v in by_label.items()
                 if v[0]["objective"] == "sapo" and len(v) > 1}
    if sapo_rows:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
        for ax, sign, title in ((axes[0], "pos", "A > 0"), (axes[1], "neg", "A <= 0")):
            for label, entries in sapo_rows.items():
                ys = [r[f"gate_lt_0.5_{sign}"] if r[f"gate_lt_0.5_{sign}"] is not None else math.nan for r in entries]
                ax.plot([r["staleness"] for r in entries], ys, marker="o", label=label)
            ax.set_title(f"share of tokens with SAPO gate w < 0.5, {title}", fontsize=9)
            ax.set_xlabel("staleness K")
            ax.set_yscale("symlog", linthresh=1e-4)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        save_figure(fig, plots, "gate_vs_staleness", saved)
    return saved
