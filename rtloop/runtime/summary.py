"""The end-of-run summary: percentiles per stage, rates, freshness, drops, success.

Computed from plain record dicts, so the same code summarises a live run (RecordLog) and a trace file
(`summarize(read_trace(path))`).
"""

from __future__ import annotations

import numpy as np

from rtloop.runtime.records import Record, RunRecord, to_dict

# (row name, record kind, field) in table order. Inference stages come from each record's `stages`.
TICK_FIELDS = [
    ("step", "step_s"),
    ("physics", "physics_s"),
    ("render", "render_s"),
    ("action age", "action_age_s"),
    ("tick interval", "interval_s"),
    ("tick lateness", "lateness_s"),
    ("tick overrun", "overrun_s"),
]
INFERENCE_FIELDS = [("queue wait", "queue_wait_s"), ("frame age", "frame_age_s")]


class RecordLog:
    """A sink that keeps every record (as a dict) for the summary."""

    def __init__(self) -> None:
        self.info: dict = {}
        self.records: list[dict] = []

    def on_record(self, record: Record) -> None:
        if isinstance(record, RunRecord):
            self.info = record.info
        else:
            self.records.append(to_dict(record))

    def close(self) -> None:
        pass


def percentiles(values: list[float]) -> dict | None:
    if not values:
        return None
    p50, p95, p99 = np.percentile(np.asarray(values, dtype=np.float64), [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "n": len(values)}


def _rate(records: list[dict], key: str) -> float | None:
    """Events per second, per episode span, pooled over episodes."""
    count, span = 0, 0.0
    for ep in sorted({r["episode"] for r in records}):
        times = sorted(r[key] for r in records if r["episode"] == ep)
        if len(times) > 1:
            count += len(times) - 1
            span += times[-1] - times[0]
    return count / span if span > 0 else None


def summarize(records: list[dict]) -> dict:
    ticks = [r for r in records if r["kind"] == "tick"]
    infs = [r for r in records if r["kind"] == "inference"]
    episodes = [r for r in records if r["kind"] == "episode"]
    stages: dict[str, dict | None] = {}
    stage_names = list(dict.fromkeys(name for r in infs for name in r["stages"]))
    for name in stage_names:
        stages[name] = percentiles([r["stages"][name] for r in infs if name in r["stages"]])
    stages["inference"] = percentiles([r["t_end"] - r["t_start"] for r in infs])
    for row, fld in INFERENCE_FIELDS:
        stages[row] = percentiles([r[fld] for r in infs])
    for row, fld in TICK_FIELDS:
        stages[row] = percentiles([r[fld] for r in ticks if r[fld] is not None])
    sources = [r["action_source"] for r in ticks]
    return {
        "stages_s": stages,
        "ticks": len(ticks),
        "inferences": len(infs),
        "sim_hz": _rate(ticks, "t_start"),
        "inference_hz": _rate(infs, "t_end"),
        "fresh_fraction": sources.count("fresh") / len(sources) if sources else None,
        "held": sources.count("held"),
        "dummy": sources.count("dummy"),
        "stop": sources.count("stop"),
        "frames_dropped": max((r["frames_dropped_total"] for r in ticks), default=0),
        "overruns": sum(1 for r in ticks if r["overrun_s"] > 0),
        "episodes": [
            {"episode": e["episode"], "steps": e["steps"], "success": e["success"], "error": e["error"]}
            for e in episodes
        ],
        "success_rate": sum(e["success"] for e in episodes) / len(episodes) if episodes else None,
        "errors": [f'{r["error_kind"]}: {r["message"]}' for r in records if r["kind"] == "error"],
        "alerts": [f'{r["alert_kind"]}: {r["message"]}' for r in records if r["kind"] == "alert"],
    }


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_summary(summary: dict, title: str = "") -> str:
    lines = [title] if title else []
    lines.append(f"{'stage (ms)':<16}{'p50':>9}{'p95':>9}{'p99':>9}{'n':>7}")
    for name, p in summary["stages_s"].items():
        if p is not None:
            lines.append(f"{name:<16}{p['p50'] * 1e3:>9.1f}{p['p95'] * 1e3:>9.1f}{p['p99'] * 1e3:>9.1f}{p['n']:>7}")
    fresh = summary["fresh_fraction"]
    lines.append(
        f"sim {_num(summary['sim_hz'], '.1f')} Hz  inference {_num(summary['inference_hz'], '.2f')} Hz  "
        f"fresh {_num(None if fresh is None else 100 * fresh, '.0f')}%  held {summary['held']}  "
        f"dummy {summary['dummy']}  stop {summary['stop']}  dropped frames {summary['frames_dropped']}  overruns {summary['overruns']}"
    )
    for e in summary["episodes"]:
        outcome = "success" if e["success"] else "failure"
        if e["error"]:
            outcome = f"ended on error ({e['error']})"
        lines.append(f"episode {e['episode']}: {e['steps']} steps, {outcome}")
    for alert in summary["alerts"]:
        lines.append(f"alert: {alert}")
    if summary["success_rate"] is not None:
        lines.append(f"success rate {100 * summary['success_rate']:.0f}% ({len(summary['episodes'])} episodes)")
    return "\n".join(lines)
