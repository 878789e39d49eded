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
    """Events per second, per episode span (of one env), pooled over episodes and envs."""
    count, span = 0, 0.0
    groups: dict[tuple, list[float]] = {}
    for r in records:
        groups.setdefault((r.get("env", 0), r["episode"]), []).append(r[key])
    for times in groups.values():
        if len(times) > 1:
            count += len(times) - 1
            span += max(times) - min(times)
    return count / span if span > 0 else None


def frames_dropped(ticks: list[dict]) -> int:
    """Total frames dropped: each env's running count summed over envs. A count that falls starts again
    from 0 (a fleet's env whose worker was replaced)."""
    total, last = 0, {}
    for r in ticks:
        env, value = r.get("env", 0), r["frames_dropped_total"]
        before = last.get(env, 0)
        total += value - before if value >= before else value
        last[env] = value
    return total


def fleet_figures(ticks: list[dict], infs: list[dict]) -> dict:
    """Per env: ticks, sim Hz, fresh fraction, action age, drops. For the fleet: how many frames went into
    each policy call (batch sizes), frames and batches per second."""
    per_env = {}
    for env in sorted({r.get("env", 0) for r in ticks}):
        mine = [r for r in ticks if r.get("env", 0) == env]
        sources = [r["action_source"] for r in mine]
        per_env[str(env)] = {
            "ticks": len(mine),
            "sim_hz": _rate(mine, "t_start"),
            "fresh_fraction": sources.count("fresh") / len(sources),
            "action_age_s": percentiles([r["action_age_s"] for r in mine if r["action_age_s"] is not None]),
            "frames_dropped": frames_dropped(mine),
        }
    batches = [r for r in infs if r.get("batch_index", 0) == 0]
    sizes = [r.get("batch_size", 1) for r in batches]
    span = max((r["t_end"] for r in infs), default=0.0) - min((r["t_start"] for r in infs), default=0.0)
    return {
        "envs": len(per_env),
        "per_env": per_env,
        "batches": len(batches),
        "batch_sizes": {str(k): sizes.count(k) for k in sorted(set(sizes))},
        "batch_size_mean": sum(sizes) / len(sizes) if sizes else None,
        "frames_per_s": len(infs) / span if span > 0 else None,
        "batches_per_s": len(batches) / span if span > 0 else None,
    }


def chunk_figures(ticks: list[dict]) -> dict | None:
    """Ticks that executed a chunk's action, how many of those were merged with an older chunk, and their
    staleness: position in the chunk (ticks since its observation) and ticks since the chunk arrived."""
    mine = [r for r in ticks if r["action_source"] == "chunk"]
    if not mine:
        return None
    return {"ticks": len(mine), "merged": sum(1 for r in mine if r["chunk_merged"]),
            "chunk_len": max(r["chunk_len"] for r in mine),
            "index": percentiles([float(r["chunk_index"]) for r in mine]),
            "age_ticks": percentiles([float(r["chunk_age_ticks"]) for r in mine])}


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
        "chunks": chunk_figures(ticks),
        "frames_dropped": frames_dropped(ticks),
        "overruns": sum(1 for r in ticks if r["overrun_s"] > 0),
        "episodes": [
            {"episode": e["episode"], "steps": e["steps"], "success": e["success"], "error": e["error"],
             "env": e.get("env", 0)}
            for e in episodes
        ],
        "success_rate": sum(e["success"] for e in episodes) / len(episodes) if episodes else None,
        "errors": [f'{r["error_kind"]}: {r["message"]}' for r in records if r["kind"] == "error"],
        "alerts": [f'{r["alert_kind"]}: {r["message"]}' for r in records if r["kind"] == "alert"],
        "fleet": fleet_figures(ticks, infs),
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
    chunks = summary.get("chunks")
    if chunks:
        lines.append(f"chunks: {chunks['ticks']} ticks from chunks of {chunks['chunk_len']} ({chunks['merged']} merged), "
                     f"index in chunk p50/p99 {chunks['index']['p50']:.0f}/{chunks['index']['p99']:.0f}, "
                     f"ticks since arrival p50/p99 {chunks['age_ticks']['p50']:.0f}/{chunks['age_ticks']['p99']:.0f}")
    fleet = summary.get("fleet")
    if fleet and fleet["envs"] > 1:
        sizes = " ".join(f"{k}:{v}" for k, v in fleet["batch_sizes"].items())
        lines.append(f"fleet of {fleet['envs']} envs: {fleet['batches']} batches (size:count {sizes}), "
                     f"{_num(fleet['frames_per_s'], '.1f')} frames/s, {_num(fleet['batches_per_s'], '.1f')} batches/s")
        for env, e in fleet["per_env"].items():
            age = e["action_age_s"]
            ages = "-" if age is None else f"{age['p50'] * 1e3:.0f}/{age['p99'] * 1e3:.0f}"
            lines.append(f"  env {env}: {e['ticks']} ticks at {_num(e['sim_hz'], '.1f')} Hz, fresh "
                         f"{100 * e['fresh_fraction']:.0f}%, action age p50/p99 {ages} ms, "
                         f"dropped {e['frames_dropped']}")
    for e in summary["episodes"]:
        outcome = "success" if e["success"] else "failure"
        if e["error"]:
            outcome = f"ended on error ({e['error']})"
        env = f" (env {e['env']})" if fleet and fleet["envs"] > 1 else ""
        lines.append(f"episode {e['episode']}{env}: {e['steps']} steps, {outcome}")
    for alert in summary["alerts"]:
        lines.append(f"alert: {alert}")
    if summary["success_rate"] is not None:
        lines.append(f"success rate {100 * summary['success_rate']:.0f}% ({len(summary['episodes'])} episodes)")
    return "\n".join(lines)
