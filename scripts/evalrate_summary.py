"""The eval-throughput table of `scripts/gpu_bench.sh evalrate`: one row per `rtloop eval` run (its
table.json under DIR/evalrate-*/), episodes per hour over the invocation and after its setup, GPU
utilisation while episodes ran, and the official 500-episode protocol's wall time: measured where a run
was the whole protocol, else a PROJECTION from the best rate.

    python3 scripts/evalrate_summary.py OUT [OUT ...] [--json FILE]

Several OUT directories merge (one `gpu_bench.sh evalrate` call per N keeps each call short).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

PROTOCOL_EPISODES = 500  # libero_object: 10 tasks x 50 init states
NAME = re.compile(r"^evalrate-(?P<policy>[^-]+)-(?P<engine>.+)-(?P<clock>wall|virtual)-n(?P<envs>\d+)$")


def rows_of(dirs: list[Path]) -> list[dict]:
    rows = []
    for out in dirs:
        for path in sorted(out.glob("evalrate-*/table.json")):
            match = NAME.match(path.parent.name)
            if match is None:
                continue
            doc = json.loads(path.read_text())
            t, gpu = doc["throughput"], doc.get("gpu", {})
            use = None
            if gpu.get("sampled"):  # the busiest GPU, while episodes ran where known
                busiest = max(gpu["gpus"], key=lambda g: (g["running"] or g["invocation"])["utilization_mean_pct"])
                use = {"window": "running" if busiest["running"] else "invocation",
                       **(busiest["running"] or busiest["invocation"]),
                       "memory_peak_mib": busiest["invocation"]["memory_peak_mib"]}
            rows.append({"run": path.parent.name, "policy": match["policy"],
                         "engine": match["engine"].replace("_", "+"), "clock": match["clock"],
                         "envs": int(match["envs"]), "episodes": t["episodes"],
                         "errors": doc["total"]["errors"], "steps_mean": doc["total"]["steps_mean"],
                         "wall_s": t["wall_s"], "setup_s": t.get("setup_s"),
                         "frames_per_policy_call": t.get("frames_per_policy_call"),
                         "episodes_per_hour": t["episodes_per_hour"],
                         "episodes_per_hour_running": t.get("episodes_per_hour_running"),
                         "gpu": use, "gpu_na": None if use else gpu.get("reason")})
    return sorted(rows, key=lambda r: (r["policy"], r["engine"], r["clock"], r["envs"]))


def whole_protocol(rows: list[dict]) -> list[dict]:
    """The runs that were the whole protocol: their wall time is a measurement."""
    return [r for r in rows if r["episodes"] >= PROTOCOL_EPISODES]


def projection(rows: list[dict]) -> list[dict]:
    """Per (policy, engine, clock) without a whole-protocol run: the N with the highest rate after setup,
    and 500 episodes at that rate plus its setup. A PROJECTION: it assumes every episode as long as these
    (random weights run each to the step limit; a policy that succeeds ends sooner) and the same mix of env
    rebuilds."""
    out = []
    measured = {(r["policy"], r["engine"], r["clock"]) for r in whole_protocol(rows)}
    for key in sorted({(r["policy"], r["engine"], r["clock"]) for r in rows} - measured):
        mine = [r for r in rows if (r["policy"], r["engine"], r["clock"]) == key and r["episodes_per_hour_running"]]
        if not mine:
            continue
        best = max(mine, key=lambda r: r["episodes_per_hour_running"])
        wall = best["setup_s"] + 3600 * PROTOCOL_EPISODES / best["episodes_per_hour_running"]
        out.append({"policy": key[0], "engine": key[1], "clock": key[2], "envs": best["envs"],
                    "projected_wall_s": wall, "what": "PROJECTION, not a measurement"})
    return out


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dirs", type=Path, nargs="+")
    p.add_argument("--json", type=Path, default=None, help="also write the rows and projections here")
    args = p.parse_args()
    rows = rows_of(args.dirs)
    print("| policy | engine | clock | N | episodes | errors | steps (mean) | frames per call | setup s | episodes/h | "
          "episodes/h after setup | GPU util mean / p50 | GPU peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        g = r["gpu"]
        util = f"n/a ({r['gpu_na']})" if g is None else \
            f"{g['utilization_mean_pct']:.0f}% / {g['utilization_p50_pct']:.0f}% ({g['window']})"
        peak = "-" if g is None else f"{g['memory_peak_mib'] / 1024:.1f}"
        print(f"| {r['policy']} | {r['engine']} | {r['clock']} | {r['envs']} | {r['episodes']} | {r['errors']} | "
              f"{_num(r['steps_mean'], '.0f')} | {_num(r['frames_per_policy_call'], '.1f')} | "
              f"{_num(r['setup_s'], '.0f')} | {_num(r['episodes_per_hour'], '.0f')} | "
              f"{_num(r['episodes_per_hour_running'], '.0f')} | {util} | {peak} |")
    for r in whole_protocol(rows):
        print(f"MEASURED: the {r['episodes']}-episode libero_object protocol with {r['policy']} {r['engine']} on the "
              f"{r['clock']} clock at N={r['envs']} took {r['wall_s'] / 60:.1f} min ({r['wall_s']:.0f} s, its "
              f"{_num(r['setup_s'], '.0f')} s setup included), {r['errors']} episodes ending on an error")
    projections = projection(rows)
    for pr in projections:
        print(f"PROJECTION (not measured): the {PROTOCOL_EPISODES}-episode libero_object protocol with {pr['policy']} "
              f"{pr['engine']} on the {pr['clock']} clock at N={pr['envs']}: {pr['projected_wall_s'] / 60:.0f} min "
              f"({pr['projected_wall_s'] / 3600:.2f} h), from that run's rate after setup, every episode as long as "
              "its episodes, plus its setup")
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": rows, "whole_protocol": whole_protocol(rows),
                                         "projections": projections}, indent=2) + "\n")


if __name__ == "__main__":
    main()
