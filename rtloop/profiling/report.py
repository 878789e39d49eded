"""The per-stage throughput report of one profiled run: where the wall time went, per stage and per thread,
and the inference rate that implies.

Stages come from the run's JSONL trace (rtloop's own clock, every tick and inference). Threads come from
py-spy's on-CPU samples (no --idle): a thread's summed sample weight is the time it was busy. Both are
shown as fractions of the loop's wall time: per episode, first tick start to last tick end. Under py-spy
--native the thread numbers are marked unreliable (NATIVE_CAVEAT); the stage lanes, from the trace, are not.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from rtloop.policy.base import STAGES, SUB_STAGES

# The calls a worker thread makes during the loop itself; anything else it runs (env creation, reset,
# warm-up, close) is setup, shown apart so it does not inflate the loop's shares.
LOOP_CALLS = ("act", "step")
POOL_FILE = "concurrent/futures/thread.py"  # _WorkItem.run: the frame above it is the submitted call
WORKER_FILE = "rtloop/runtime/worker.py"  # WorkerThread.run wraps the call in `job`
EVENT_LOOP_FILES = ("asyncio/base_events.py", "anyio/_backends/", "anyio/_core/_eventloop.py")
NATIVE_CAVEAT = (
    "unreliable under py-spy --native: native unwinding pauses the process so long that py-spy's idle check "
    "misses waits (threads in epoll_wait or waiting for the GIL count as on-CPU; benfred/py-spy#92)"
)


def loop_windows(records: list[dict]) -> dict[int, tuple[float, float]]:
    """episode -> (first tick start, last tick end)."""
    windows: dict[int, tuple[float, float]] = {}
    for r in records:
        if r["kind"] == "tick":
            lo, hi = windows.get(r["episode"], (r["t_start"], r["t_end"]))
            windows[r["episode"]] = (min(lo, r["t_start"]), max(hi, r["t_end"]))
    return windows


def stage_shares(records: list[dict]) -> dict:
    """Seconds and fraction of loop wall time per stage, for the two lanes of the loop. Each lane adds up
    to its wall time: the sim lane is step (physics, render, the rest) plus the sleep until the next tick;
    the inference lane is queue wait, the policy stages, the thread hand-off, and the rest (mostly the call
    still in flight when an episode ended)."""
    windows = loop_windows(records)
    wall = sum(hi - lo for lo, hi in windows.values())
    if wall <= 0:
        return {"wall_s": 0.0, "sim": {}, "inference": {}}

    def inside(r: dict) -> bool:
        w = windows.get(r["episode"])
        return w is not None and w[0] <= r["t_start"] <= w[1]

    ticks = [r for r in records if r["kind"] == "tick" and inside(r)]
    infs = [r for r in records if r["kind"] == "inference" and inside(r)]
    step = sum(r["step_s"] for r in ticks)
    physics = sum(r["physics_s"] for r in ticks)
    render = sum(r["render_s"] for r in ticks)
    sim = {"physics": physics, "render": render, "step other": step - physics - render, "idle": wall - step}

    stages = {s: sum(r["stages"].get(s, 0.0) for r in infs) for s in STAGES}
    named = {k for r in infs for k in r["stages"]} - set(STAGES) - set(SUB_STAGES)  # a sub-stage is in its stage
    extra = {k: sum(r["stages"][k] for r in infs) for k in sorted(named)}
    busy = sum(r["t_end"] - r["t_start"] for r in infs)
    wait = sum(r["queue_wait_s"] for r in infs)
    inference = {"queue wait": wait, **stages, **extra, "hand-off": busy - sum(stages.values()) - sum(extra.values())}
    # Not covered by a finished inference: the call in flight when an episode ended, and any idle time.
    inference["rest"] = wall - busy - wait

    def lane(d: dict) -> dict:
        return {k: {"s": v, "fraction": v / wall} for k, v in d.items()}

    return {"wall_s": wall, "ticks": len(ticks), "inferences": len(infs), "sim": lane(sim), "inference": lane(inference)}


def ceiling(records: list[dict], shares: dict, threads: dict | None) -> dict:
    """The inference rate the policy stages allow: alone (1 / p50 of processor+generate+detokenize), and
    on one core shared with the sim and the event loop. Their share of that core is their on-CPU time
    from py-spy when there are samples, else the sim's step time from the trace (an upper bound: a step
    also waits, e.g. for the GIL)."""
    infs = [r for r in records if r["kind"] == "inference"]
    per_call = [sum(r["stages"].get(s, 0.0) for s in STAGES) for r in infs]
    if not per_call or shares["wall_s"] <= 0:
        return {}
    p50 = float(np.percentile(per_call, 50))
    if threads and "rtloop-sim" in threads:
        others = sum(t["loop_busy_fraction"] for role, t in threads.items() if role != "rtloop-policy")
        source = "py-spy on-CPU samples of the other threads"
    else:
        others = 1.0 - shares["sim"]["idle"]["fraction"]
        source = "the trace's step time (no py-spy samples)"
    left = max(0.0, 1.0 - others)
    return {
        "policy_s_p50": p50,
        "ceiling_hz": 1.0 / p50,
        "others_core_fraction": others,
        "others_source": source,
        "ceiling_hz_one_core": left / p50,
        "measured_hz": shares["inferences"] / shares["wall_s"],
    }


def thread_shares(speedscope: dict, loop_wall_s: float) -> dict:
    """Busy seconds per thread and per call it was running (`OpenVLAPolicy.act`, `LiberoEnv.step`, env
    creation, warm-up, ...), and its loop work (LOOP_CALLS, or the event loop) as a fraction of loop wall."""
    frames = [(f["name"], f.get("file") or "") for f in speedscope["shared"]["frames"]]
    result = {}
    for profile in speedscope["profiles"]:
        main = _is_main_thread(profile["name"])
        by_call: dict[str, float] = defaultdict(float)
        for sample, weight in zip(profile["samples"], profile["weights"]):
            by_call[_call(main, [frames[i] for i in sample])] += weight
        loop_s = sum(s for call, s in by_call.items() if call.rsplit(".", 1)[-1] in LOOP_CALLS or call == "event loop")
        result[thread_role(profile["name"], main, by_call)] = {
            "py_spy_thread": profile["name"],
            "busy_s": sum(by_call.values()),
            "loop_busy_s": loop_s,
            "loop_busy_fraction": loop_s / loop_wall_s if loop_wall_s > 0 else None,
            "calls_s": dict(sorted(by_call.items(), key=lambda kv: -kv[1])),
        }
    return dict(sorted(result.items()))


def thread_role(profile_name: str, main: bool, by_call: dict[str, float]) -> str:
    """The runtime's name for a py-spy thread. py-spy sometimes reports an empty thread name (seen with
    --native), so a nameless worker is recognised by the calls it ran."""
    if main:
        return "main (event loop)"
    methods = {call.rsplit(".", 1)[-1] for call in by_call}
    for role, method in (("rtloop-sim", "step"), ("rtloop-policy", "act")):
        if role in profile_name or method in methods:
            return role
    return profile_name


def _is_main_thread(profile_name: str) -> bool:
    """py-spy names profiles `Process PID Thread TID "name"` (with --subprocesses) or `Thread TID "name"`;
    the main thread's TID is the PID."""
    words = profile_name.replace('"', " ").split()
    if "MainThread" in words:
        return True
    return len(words) >= 4 and words[0] == "Process" and words[2] == "Thread" and words[1] == words[3]


def _in_event_loop(stack: list[tuple[str, str]]) -> bool:
    return any(f in file for _, file in stack for f in EVENT_LOOP_FILES)


def _call(main: bool, stack: list[tuple[str, str]]) -> str:
    """The call a sample belongs to: on a worker thread, the function handed to the thread (the frame above
    concurrent.futures' _WorkItem.run, looking through WorkerThread's `job` wrapper); on the main thread,
    the event loop or start-up/teardown. Stacks are root first."""
    if main:
        return "event loop" if _in_event_loop(stack) else "startup/teardown"
    above_pool = [i + 1 for i, (name, file) in enumerate(stack) if file.endswith(POOL_FILE) and name.endswith("run")]
    if not above_pool or above_pool[-1] >= len(stack):
        return "other"
    i = above_pool[-1]
    if stack[i][1].endswith(WORKER_FILE) and i + 1 < len(stack):
        i += 1
    return stack[i][0]


def build_report(trace_records: list[dict], speedscope: dict | None, torch_stages: list[str],
                 pyspy_message: str = "", sampling: dict | None = None, load: dict | None = None) -> dict:
    shares = stage_shares(trace_records)
    threads = thread_shares(speedscope, shares["wall_s"]) if speedscope else None
    run = next((r for r in trace_records if r["kind"] == "run"), {})
    native = bool(threads) and bool((sampling or {}).get("native"))
    return {
        "run": {k: run.get(k) for k in ("policy", "sim", "rate", "device", "machine") if k in run},
        "load": load,
        "stages": shares,
        "ceiling": ceiling(trace_records, shares, threads),
        "threads": threads,
        # On-CPU time per thread, and the one-core ceiling derived from it, cannot be trusted under --native.
        "threads_caveat": NATIVE_CAVEAT if native else "",
        "pyspy": pyspy_message or "ok",
        "sampling": sampling,
        "torch_trace_stages": torch_stages,
    }


def format_report(report: dict, title: str) -> str:
    st = report["stages"]
    lines = [f"# {title}", ""]
    run = report["run"]
    if run:
        lines.append(f"Run: {run.get('policy')} | {run.get('sim')} | {run.get('rate')} Hz on {run.get('device')} | "
                     f"host {run.get('machine', {}).get('host')}, {run.get('machine', {}).get('cpu_count')} CPUs.")
    if report["load"]:
        lines.append(f"Machine load average (1 min) before / after the run: {report['load']['before']:.1f} / "
                     f"{report['load']['after']:.1f} (other work on the machine stretches every number below).")
    lines.append(f"Loop wall time: {st['wall_s']:.2f} s, {st.get('ticks', 0)} ticks, {st.get('inferences', 0)} inferences.")
    lines.append("")
    for lane in ("sim", "inference"):
        lines.append(f"| {lane} lane | seconds | share of loop wall |")
        lines.append("|---|---:|---:|")
        for name, v in st.get(lane, {}).items():
            lines.append(f"| {name} | {v['s']:.3f} | {100 * v['fraction']:.1f}% |")
        lines.append("")
    c = report["ceiling"]
    caveat = report.get("threads_caveat", "")
    if c:
        one_core = (f"the sim and event loop take {100 * c['others_core_fraction']:.0f}% of a core ({c['others_source']}), "
                    f"leaving {c['ceiling_hz_one_core']:.2f} Hz if all shared one core")
        if caveat and c["others_source"].startswith("py-spy"):
            one_core = f"what one core leaves after the sim and event loop ({c['ceiling_hz_one_core']:.2f} Hz) is {caveat}"
        lines.append(
            f"Inference ceiling: policy stages (processor+generate+detokenize) p50 {1000 * c['policy_s_p50']:.1f} ms "
            f"-> {c['ceiling_hz']:.2f} Hz with a core to itself; {one_core}. Measured: {c['measured_hz']:.2f} Hz."
        )
        lines.append("")
    if report["threads"]:
        q = report["sampling"] or {}
        if q.get("samples") is not None:
            lines.append(f"py-spy: {q['flags']}, {q['samples']} samples, {q['errors']} failed, fell behind its "
                         f"schedule by up to {q['max_behind_s']:.1f} s (0 = every sample taken on time).")
            lines.append("")
        if caveat:
            lines.append(f"**Thread on-CPU times below are {caveat}.** Read them as where the samples fell, not as busy time.")
            lines.append("")
        lines.append("| thread (py-spy, on-CPU samples) | busy in loop | share of loop wall | busy, by call |")
        lines.append("|---|---:|---:|---|")
        for role, t in report["threads"].items():
            frac = t["loop_busy_fraction"]
            by_call = ", ".join(f"{call} {s:.2f} s" for call, s in list(t["calls_s"].items())[:5])
            lines.append(f"| {role} | {t['loop_busy_s']:.2f} s | {'-' if frac is None else f'{100 * frac:.1f}%'} "
                         f"| {by_call} |")
        lines.append("")
    else:
        lines.append(f"Threads: no py-spy samples ({report['pyspy']}).")
        lines.append("")
    lines.append(f"Stages in the torch trace: {', '.join(report['torch_trace_stages']) or 'none'}.")
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path, report: dict, title: str) -> str:
    text = format_report(report, title)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "report.md").write_text(text)
    return text
