"""The fleet-capacity table of issue 16: one row per `rtloop run --envs N` (its summary.json under
DIR/fleet-<engine>-n<N>/), and per engine the largest N at which every env holds 20 Hz: its sim runs
>= 19.5 Hz with >= 95% fresh actions and action age p99 <= 100 ms.

    python3 scripts/fleet_summary.py OUT [OUT ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HOLDS = {"sim_hz": 19.5, "fresh": 0.95, "action_age_p99_s": 0.100}


def rows_of(dirs: list[Path]) -> list[dict]:
    rows = []
    for out in dirs:
        for path in sorted(out.glob("fleet-*-n*/summary.json")):
            s = json.loads(path.read_text())
            engine, n = path.parent.name.removeprefix("fleet-").rsplit("-n", 1)
            engine, _, variant = engine.partition("-")  # e.g. compiled_fp8-serial_image
            engine = engine.replace("_", "+") + (f" ({variant.replace('_', ' ')})" if variant else "")
            image = s["stages_s"].get("libero_image")
            envs = list(s["fleet"]["per_env"].values())
            worst_hz = min(e["sim_hz"] or 0 for e in envs)
            worst_fresh = min(e["fresh_fraction"] for e in envs)
            worst_age = max(e["action_age_s"]["p99"] for e in envs if e["action_age_s"])
            holds = worst_hz >= HOLDS["sim_hz"] and worst_fresh >= HOLDS["fresh"] and worst_age <= HOLDS["action_age_p99_s"]
            rows.append({"engine": engine, "envs": int(n), "worst_sim_hz": worst_hz,
                         "worst_fresh": worst_fresh, "worst_action_age_p99_s": worst_age, "holds_20hz": holds,
                         "errors": sum(1 for e in s["episodes"] if e["error"]),
                         "batch_size_mean": s["fleet"]["batch_size_mean"], "frames_per_s": s["fleet"]["frames_per_s"],
                         "inference_p50_s": s["stages_s"]["inference"]["p50"],
                         "libero_image_p50_s": image["p50"] if image else None})
    return sorted(rows, key=lambda r: (r["engine"], r["envs"]))


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1e3 * seconds:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dirs", type=Path, nargs="+")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    rows = rows_of(a.dirs)
    capacity = {e: max([r["envs"] for r in rows if r["engine"] == e and r["holds_20hz"]], default=0)
                for e in sorted({r["engine"] for r in rows})}
    if a.json:
        a.json.write_text(json.dumps({"holds": HOLDS, "rows": rows, "capacity": capacity}, indent=2) + "\n")
    print("| engine | N | worst sim Hz | worst fresh | worst action age p99 ms | batch mean | frames/s | "
          "inference p50 ms | of which libero_image p50 ms | errors | holds |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['engine']} | {r['envs']} | {r['worst_sim_hz']:.1f} | {100 * r['worst_fresh']:.1f}% | "
              f"{1e3 * r['worst_action_age_p99_s']:.0f} | {r['batch_size_mean']:.1f} | {r['frames_per_s']:.1f} | "
              f"{1e3 * r['inference_p50_s']:.1f} | {ms(r['libero_image_p50_s'])} | {r['errors']} | {'yes' if r['holds_20hz'] else 'no'} |")
    print("fleet capacity (largest N that holds 20 Hz):", capacity)


if __name__ == "__main__":
    main()
