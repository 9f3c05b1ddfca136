"""gpu_check output: the goals judged from the sections' numbers, the stdout summary and gpu_check.md."""

from __future__ import annotations

from pathlib import Path

# Measured on an H100 (bf16, random weights) before this check existed (the issue's anchors).
ANCHORS = [
    "loss head N=16,384 d=2,048 V=151,936: matmul floor 41.9 ms; TRL row-wise 57.9 ms, 13.9 GiB; Liger Triton "
    "59.7 ms, 13.9 GiB; Liger chunked 580-670 ms, 2.4 GiB; plain-torch chunked 101-131 ms",
    "loss head N=32,768 d=4,096: floor 174.6 ms, TRL 207 ms, Liger 199 ms",
    "HF generate, Qwen3-0.6B shape, 64 x 256: 1.6-2.0k tokens/s (static cache + compile 6.6k)",
    "one HF training step of that model at 8 x 1,024 tokens: 18.4 % MFU",
]


def _get(sections: dict, *keys):
    value = sections
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def goals(sections: dict, profile) -> list[dict]:
    """The issue's goals, each with its measured value; met=None where not measured or on the smoke profile."""
    ours = _get(sections, "rollout", "result", "ours", "tokens_per_s")
    compiled = _get(sections, "rollout_compile", "result", "hf_static_compile", "tokens_per_s")
    rows = [
        ("fused head <= 1.15 x matmul floor (shape 1)", _get(sections, "loss_head", "result", "shape1", "fused", "x_floor"),
         lambda v: v <= 1.15, "{:.2f}x"),
        ("fused head peak < 3 GiB above inputs (shape 1)",
         _get(sections, "loss_head", "result", "shape1", "fused", "peak_gib_above_inputs"), lambda v: v < 3.0, "{:.2f} GiB"),
        ("fused head < 200 ms (shape 2)", _get(sections, "loss_head", "result", "shape2", "fused", "seconds"),
         lambda v: v < 0.2, "{:.4f} s"),
        ("rollout >= 3 x HF generate (default cache)", _get(sections, "rollout", "result", "ours_x_hf_default"),
         lambda v: v >= 3.0, "{:.2f}x"),
        ("rollout ahead of HF generate static cache + compile", ours / compiled if ours and compiled else None,
         lambda v: v > 1.0, "{:.2f}x"),
        ("update >= 35 % MFU", _get(sections, "train", "result", "train", "mfu")
         or _get(sections, "train", "result", "updates", "mfu"), lambda v: v >= 0.35, "{:.1%}"),
    ]
    out = []
    for goal, value, test, fmt in rows:
        met = None if value is None or profile.name != "gpu" else bool(test(value))
        out.append({"goal": goal, "value": value, "shown": "-" if value is None else fmt.format(value), "met": met})
    return out


def _section_note(name: str, data: dict) -> str:
    status = data.get("status")
    if status not in ("ok", "failed"):
        return str(data.get("reason") or data.get("error") or "")[:100]
    result, checks = data.get("result", {}), data.get("checks", {})
    if name == "env":
        env = result.get("env", {})
        return (f"{env.get('card', 'cpu')}, torch {env.get('torch')}, transformers {env.get('transformers')}, "
                f"triton {env.get('triton')}")
    if checks:
        ran = [c for c in checks.values() if c.get("passed") is not None]
        passed = sum(bool(c["passed"]) for c in ran)
        skipped = len(checks) - len(ran)
        failed = [k for k, c in checks.items() if c.get("passed") is False]
        return f"{passed}/{len(ran)} checks passed" + (f", {skipped} skipped" if skipped else "") + (
            f"; FAILED: {', '.join(failed)}" if failed else "")
    return ""


def _head_lines(sections: dict) -> list[str]:
    lines = []
    for key, shape in sorted((_get(sections, "loss_head", "result") or {}).items()):
        if not isinstance(shape, dict) or "n" not in shape:
            continue
        parts = []
        for variant in ("floor", "trl", "fused", "chunked"):
            r = shape.get(variant)
            if not isinstance(r, dict):
                continue
            if "error" in r:
                parts.append(f"{variant} error")
                continue
            text = f"{variant} {1000 * r['seconds']:.1f} ms"
            if r.get("peak_gib_above_inputs") is not None:
                text += f" {r['peak_gib_above_inputs']:.2f} GiB"
            if "x_floor" in r:
                text += f" x{r['x_floor']:.2f}"
            parts.append(text)
        lines.append(f"  {key} N={shape['n']} d={shape['d']} V={shape['vocab']}: " + " | ".join(parts))
    return lines


def _rollout_line(sections: dict) -> str | None:
    ours = _get(sections, "rollout", "result", "ours", "tokens_per_s")
    default = _get(sections, "rollout", "result", "hf_default", "tokens_per_s")
    compiled = _get(sections, "rollout_compile", "result", "hf_static_compile", "tokens_per_s")
    if not any((ours, default, compiled)):
        return None
    parts = [f"ours {ours:.0f}" if ours else "ours -", f"hf default {default:.0f}" if default else "hf default -",
             f"hf static+compile {compiled:.0f}" if compiled else "hf static+compile -"]
    first = _get(sections, "rollout_compile", "result", "first_call_s")
    return "  tokens/s: " + " | ".join(parts) + (f" (compile call {first:.0f} s)" if first else "")


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _train_line(sections: dict) -> str | None:
    t = _get(sections, "train", "result", "train")
    if not t:  # stopped before the end: the updates it finished
        u = _get(sections, "train", "result", "updates")
        if not u or "calls" not in u:
            return None
        return (f"  stopped after {u['calls']} updates; {_fmt(u.get('tokens_per_s'), ',.0f')} tokens/s, "
                f"{_fmt(u.get('tflops'), '.3g')} TFLOP/s, MFU {_fmt(u.get('mfu'), '.1%')}")
    return (f"  {t.get('steps')} steps ({t.get('steps_timed')} timed), step {_fmt(t.get('step_s_median'), '.2f')} s, "
            f"rollout {_fmt(t.get('rollout_s_median'), '.2f')} s; update {_fmt(t.get('update_tokens_per_s'), ',.0f')} "
            f"tokens/s, {_fmt(t.get('update_tflops'), '.3g')} TFLOP/s, MFU {_fmt(t.get('mfu'), '.1%')} ({t.get('card')})")


def summary_table(report: dict) -> str:
    sections = report["sections"]
    lines = [f"== gpu_check summary: profile {report['profile']}, wall {report['wall_s']} s of {report['budget_s']:.0f} =="]
    lines.append(f"{'section':<16}{'status':<9}{'s':>7}  notes")
    for name, data in sections.items():
        seconds = data.get("seconds")
        lines.append(f"{name:<16}{data.get('status', '?'):<9}{'' if seconds is None else seconds:>7}  "
                     f"{_section_note(name, data)}")
    head = _head_lines(sections)
    if head:
        lines += ["loss head fwd+bwd (ms, peak GiB above inputs, x matmul floor):", *head]
    for title, line in (("rollout:", _rollout_line(sections)), ("train:", _train_line(sections))):
        if line:
            lines += [title, line]
    lines.append("goals:")
    for goal in report["goals"]:
        mark = {True: "met", False: "NOT MET", None: "n/a"}[goal["met"]]
        lines.append(f"  [{mark}] {goal['goal']}: {goal['shown']}")
    return "\n".join(lines)


def write_markdown(path: Path, report: dict) -> None:
    sections = report["sections"]
    md = [f"# gpu_check ({report['profile']} profile)", "",
          f"Wall time {report['wall_s']} s of a {report['budget_s']:.0f} s budget.", "",
          "| section | status | seconds | notes |", "|---|---|---:|---|"]
    for name, data in sections.items():
        md.append(f"| {name} | {data.get('status')} | {data.get('seconds', '')} | {_section_note(name, data)} |")
    md += ["", "## Goals", "", "| goal | measured | met |", "|---|---:|---|"]
    for goal in report["goals"]:
        md.append(f"| {goal['goal']} | {goal['shown']} | {({True: 'yes', False: 'no', None: 'n/a'})[goal['met']]} |")
    md += ["", "## Checks", ""]
    for name, data in sections.items():
        for check, c in data.get("checks", {}).items():
            details = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in c.items() if k != "passed")
            md.append(f"- {name} / {check}: **{({True: 'pass', False: 'FAIL', None: 'skip'})[c.get('passed')]}** "
                      f"({details})")
    for title, lines in (("Loss head", _head_lines(sections)), ("Rollout", [_rollout_line(sections)]),
                         ("Train", [_train_line(sections)])):
        lines = [line for line in lines if line]
        if lines:
            md += ["", f"## {title}", "", *[f"- {line.strip()}" for line in lines]]
    problems = {n: d for n, d in sections.items() if d.get("status") in ("error", "timeout", "crashed")}
    if problems:
        md += ["", "## Errors", ""]
        for name, data in problems.items():
            md += [f"### {name}: {data['status']}", "", "```",
                   str(data.get("traceback") or data.get("error") or data.get("reason"))[-3000:], "```"]
    md += ["", "## Anchors (H100, measured before this check; not from this run)", "", *[f"- {a}" for a in ANCHORS]]
    md += ["", "Full numbers: gpu_check.json (same folder).", ""]
    path.write_text("\n".join(md))
