"""The cells of a sweep and the episodes of each.

A cell is what an episode needs beyond (task, episode): its mode, its latency and the `rtloop run` options
that make it (argparse names: sync, inject_delay, latency_profile, rate, sim, checkpoint, ...). Cells are
named "async 50ms", "sync h200-compiled" (a latency profile's file stem); an episode's key is
(cell, task, episode).
"""

from __future__ import annotations

from rtloop.errors import InputError

MODES = ("async", "sync")
Key = tuple[str, int, int]  # (cell, task, episode)


def parse_ids(text: str, option: str) -> list[int]:
    """"0-9", "0,3", "0-2,7" -> sorted distinct ints."""
    ids: set[int] = set()
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            first = int(lo)
            last = int(hi) if sep else first
        except ValueError:
            raise InputError(f"{option} {text!r}: expected ids like 0-9 or 0,3") from None
        if first < 0 or last < first:
            raise InputError(f"{option} {text!r}: ids are >= 0 and ranges go up (0-9)")
        ids.update(range(first, last + 1))
    return sorted(ids)


def parse_latencies(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"--latency {text!r}: expected seconds like 0,0.05,0.1") from None
    bad = [v for v in values if not v >= 0]
    if bad:
        raise InputError(f"--latency values are delays in seconds and must be >= 0 (got {bad[0]:g})")
    return list(dict.fromkeys(values))


def parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise InputError(f"--mode {text!r}: unknown mode {unknown[0] if unknown else ''!r}; modes: {', '.join(MODES)}")
    return list(dict.fromkeys(modes))


def latency_name(seconds: float) -> str:
    return f"{seconds * 1000:g}ms"


def profile_name(spec: str) -> str:
    """"profiles/latency/h200-compiled.json" -> "h200-compiled"; "bench.json:compiled+fp8" -> "bench:compiled+fp8"."""
    from rtloop.runtime.latency import split_profile_spec

    path, engine = split_profile_spec(spec)
    return path.stem + (f":{engine}" if engine else "")


def sweep_cells(latencies: list[float], profiles: dict[str, float], modes: list[str], run: dict,
                profile_run: dict) -> dict[str, dict]:
    """mode x latency, each cell with the `rtloop run` options that make it. `run` holds the options all
    cells share, `profile_run` those of the profile cells (order, scale); `profiles` maps each
    --latency-profile spec to its median latency (scaled), where the plot puts it."""
    names = [profile_name(spec) for spec in profiles]
    if len(set(names)) < len(names):
        raise InputError(f"--latency-profile files must have distinct names (got {', '.join(names)})")
    cells: dict[str, dict] = {}
    for mode in modes:
        sync = mode == "sync"
        for seconds in latencies:
            cells[f"{mode} {latency_name(seconds)}"] = {
                "mode": mode, "latency_s": seconds, "run": {**run, "sync": sync, "inject_delay": seconds}}
        for name, (spec, p50) in zip(names, profiles.items()):
            cells[f"{mode} {name}"] = {
                "mode": mode, "latency_profile": spec, "latency_p50_s": p50,
                "run": {**run, **profile_run, "sync": sync, "latency_profile": spec}}
    return cells


def episode_keys(cells: dict[str, dict], tasks: list[int], episodes: list[int]) -> list[Key]:
    """Cell-major, then task: consecutive episodes share a cell and a task, so a worker keeps its env and
    policy from one episode to the next."""
    return [(cell, task, ep) for cell in cells for task in tasks for ep in episodes]
