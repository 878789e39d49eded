"""Per-group figures from results rows: success rate with its Wilson interval, fresh fraction, action age,
episode length. Episodes that ended on an error are counted apart: they are not outcomes of the policy."""

from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval for a binomial proportion (None for n = 0). Unlike p +- z*sqrt(p(1-p)/n)
    it stays inside [0, 1] and is not empty at 0/n or n/n."""
    if n == 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def aggregate(rows: Iterable[dict]) -> dict:
    rows = list(rows)
    ok = [r for r in rows if not r.get("error")]
    successes = sum(bool(r["success"]) for r in ok)
    ticks = sum(r["ticks"] for r in ok)
    ages = np.asarray([a for r in ok for a in r["action_ages_ms"]], dtype=np.float64) / 1e3
    p50, p95 = np.percentile(ages, [50, 95]) if ages.size else (None, None)
    return {
        "episodes": len(ok),
        "successes": successes,
        "success_rate": successes / len(ok) if ok else None,
        "ci95": wilson(successes, len(ok)),
        "errors": len(rows) - len(ok),
        "fresh_fraction": sum(r["fresh"] for r in ok) / ticks if ticks else None,
        "action_age_p50_s": None if p50 is None else float(p50),
        "action_age_p95_s": None if p95 is None else float(p95),
        "steps_mean": float(np.mean([r["steps"] for r in ok])) if ok else None,
    }


def group_by(rows: Iterable[dict], key: Callable[[dict], object]) -> dict:
    groups: dict = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    return {k: aggregate(v) for k, v in groups.items()}
