"""The tables (Markdown and JSON) and the plot of a sweep or an eval, from its results rows."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

from rtloop.eval.stats import aggregate, group_by


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _ci(ci: tuple[float, float] | None) -> str:
    return "-" if ci is None else f"{100 * ci[0]:.0f}-{100 * ci[1]:.0f}%"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{1e3 * x:.0f}"


def _success(a: dict) -> str:
    return f"{_pct(a['success_rate'])} ({a['successes']}/{a['episodes']})"


def labels(rows: list[dict], field: str) -> list[str]:
    return sorted({r[field] for r in rows if r.get(field)})


def alert_lines(rows: list[dict]) -> list[str]:
    """Each kind of alert once, with the number of episodes that raised it and its first message (a
    stale action's or a pause's message names its own age and step: one line each would bury the rest)."""
    first: dict[str, str] = {}
    episodes: dict[str, int] = {}
    for row in rows:
        kinds = set()
        for alert in row.get("alerts", []):
            kind = alert.split(":", 1)[0]
            first.setdefault(kind, alert)
            kinds.add(kind)
        for kind in kinds:
            episodes[kind] = episodes.get(kind, 0) + 1
    if not first:
        return []
    return ["", "Alerts (possible silent failures; each kind's first message):", ""] + [
        f"- SILENT FAILURE? {message} ({episodes[kind]} episodes)" for kind, message in first.items()]


def header_lines(title: str, rows: list[dict], notes: list[str]) -> list[str]:
    """Title, then what produced the numbers: policy and sim labels say RANDOM WEIGHTS and replay."""
    lines = [f"# {title}", ""]
    lines += [f"- policy: {p}" for p in labels(rows, "policy")]
    lines += [f"- sim: {s}" for s in labels(rows, "sim")]
    lines += [f"- {n}" for n in notes]
    return [*lines, ""]


def sweep_tables(cells: dict[str, dict], rows: list[dict], notes: list[str]) -> tuple[str, dict]:
    by_cell = group_by(rows, lambda r: r["cell"])
    per_task = {cell: group_by([r for r in rows if r["cell"] == cell], lambda r: r["task"]) for cell in cells}
    md = header_lines("rtloop sweep", rows, notes)
    md += ["| mode | latency | episodes | success | 95% CI | fresh | action age p50 / p95 (ms) | steps (mean) | errors |",
           "|---|---|---|---|---|---|---|---|---|"]
    table = []
    for name, cell in cells.items():
        a = by_cell.get(name) or aggregate([])
        if "latency_profile" in cell:
            latency = f"{cell['latency_profile']} (p50 {1e3 * cell['latency_p50_s']:.0f} ms)"
        else:
            latency = f"{1e3 * cell['latency_s']:g} ms"
        steps = "-" if a["steps_mean"] is None else f"{a['steps_mean']:.1f}"
        md.append(f"| {cell['mode']} | {latency} | {a['episodes']} | {_success(a)} | {_ci(a['ci95'])} | "
                  f"{_pct(a['fresh_fraction'])} | {_ms(a['action_age_p50_s'])} / {_ms(a['action_age_p95_s'])} | "
                  f"{steps} | {a['errors']} |")
        table.append({"cell": name, "mode": cell["mode"], "latency_s": cell.get("latency_s"),
                      "latency_profile": cell.get("latency_profile"), "latency_p50_s": cell.get("latency_p50_s"), **a,
                      "per_task": {str(t): v for t, v in sorted(per_task[name].items())}})
    md += alert_lines(rows)
    doc = {"kind": "sweep", "policy": labels(rows, "policy"), "sim": labels(rows, "sim"), "notes": notes,
           "cells": table}
    return "\n".join(md) + "\n", doc


def eval_tables(rows: list[dict], notes: list[str], throughput: dict, gpu: dict) -> tuple[str, dict]:
    """gpu: rtloop.eval.gpu.GpuSampler.summary()."""
    from rtloop.eval.gpu import describe
    by_task = group_by(rows, lambda r: r["task"])
    instructions = {r["task"]: r["instruction"] for r in rows if r.get("instruction")}
    total = aggregate(rows)
    md = header_lines("rtloop eval", rows, notes)
    md += ["| task | instruction | episodes | success | 95% CI | fresh | steps (mean) | errors |",
           "|---|---|---|---|---|---|---|---|"]

    def line(task: str, instruction: str, a: dict) -> str:
        steps = "-" if a["steps_mean"] is None else f"{a['steps_mean']:.1f}"
        return (f"| {task} | {instruction} | {a['episodes']} | {_success(a)} | {_ci(a['ci95'])} | "
                f"{_pct(a['fresh_fraction'])} | {steps} | {a['errors']} |")

    for task, a in sorted(by_task.items()):
        md.append(line(str(task), instructions.get(task, ""), a))
    md.append(line("**all**", "", total))
    eph = throughput.get("episodes_per_hour")
    rate = (f"Throughput (this invocation): {throughput['episodes']} episodes in {throughput['wall_s']:.1f} s "
            f"with {throughput['envs']} envs ({throughput['runner']}) = {'-' if eph is None else f'{eph:.0f}'} "
            "episodes per hour")
    if throughput.get("episodes_per_hour_running") is not None:
        rate += (f"; {throughput['episodes_per_hour_running']:.0f} per hour over the {throughput['running_s']:.1f} s "
                 f"after the {throughput['setup_s']:.1f} s setup (policy built and warmed up, first envs built)")
    if throughput.get("frames_per_policy_call") is not None:
        rate += (f". Frames per policy call: {throughput['frames_per_policy_call']:.1f} (mean over the table's "
                 "inferences)")
    md += ["", rate + ".", "", describe(gpu), *alert_lines(rows)]
    doc = {"kind": "eval", "policy": labels(rows, "policy"), "sim": labels(rows, "sim"), "notes": notes,
           "total": total, "tasks": [{"task": t, "instruction": instructions.get(t), **a}
                                     for t, a in sorted(by_task.items())],
           "throughput": throughput, "gpu": gpu}
    return "\n".join(md) + "\n", doc


def write_tables(out: Path, md: str, doc: dict) -> None:
    (out / "table.md").write_text(md, encoding="utf-8")
    (out / "table.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


def plot_success_vs_latency(doc: dict, path: Path) -> None:
    """Success rate against latency: per mode, a line through the fixed latencies with the Wilson 95% band
    around it, and each latency profile as a point at its median latency with its interval as an error bar
    (a distribution, not on the line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    profiles: set[tuple[str, float]] = set()
    for mode in dict.fromkeys(c["mode"] for c in doc["cells"]):
        done = [c for c in doc["cells"] if c["mode"] == mode and c["episodes"]]
        fixed = sorted((c for c in done if c["latency_s"] is not None), key=lambda c: c["latency_s"])
        colour = None
        if fixed:
            x = [1e3 * c["latency_s"] for c in fixed]
            (line,) = ax.plot(x, [100 * c["success_rate"] for c in fixed], marker="o", label=mode)
            colour = line.get_color()
            ax.fill_between(x, [100 * c["ci95"][0] for c in fixed], [100 * c["ci95"][1] for c in fixed],
                            color=colour, alpha=0.2, linewidth=0)
        for c in (c for c in done if c["latency_profile"] is not None):
            y, (lo, hi) = 100 * c["success_rate"], c["ci95"]  # the interval's float ends can cross y by 1e-14
            bar = ax.errorbar([1e3 * c["latency_p50_s"]], [y], yerr=[[max(0.0, y - 100 * lo)], [max(0.0, 100 * hi - y)]], fmt="D",
                              color=colour, capsize=3, label=None if fixed else mode)
            colour = bar.lines[0].get_color()
            profiles.add((c["latency_profile"], c["latency_p50_s"]))
    for spec, p50 in sorted(profiles):  # one label per profile, whatever the modes
        ax.annotate(Path(spec.split(":")[0]).stem, (1e3 * p50, 101), rotation=90, va="top", ha="right", fontsize=7)
    ax.set_xlabel("latency per inference (ms; a profile at its median)")
    ax.set_ylabel("success rate (%), Wilson 95% band")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(title="mode")
    # the cells' labels differ only in their latency suffix: the common part, to its last ", ", names the policy
    policy = os.path.commonprefix(doc["policy"])
    if policy not in doc["policy"]:
        policy = policy[: policy.rfind(", ")] if ", " in policy else "; ".join(doc["policy"])
    policy = policy or "no episodes yet"
    subtitle = textwrap.fill(f"{policy} | {'; '.join(doc['sim'])}", 110)
    ax.set_title(f"success vs latency\n{subtitle}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
