"""The sweep's own logic on fake rows: Wilson intervals, aggregation, grids, the results file, the tables."""

import json

import pytest

from rtloop.errors import InputError
from rtloop.eval import grid, report
from rtloop.eval.pool import run_episodes
from rtloop.eval.results import ResultsFile
from rtloop.eval.stats import aggregate, group_by, wilson


@pytest.mark.parametrize("k, n, lo, hi", [
    (0, 10, 0.0, 0.27753),     # the "rule of three" regime: the interval is not empty at 0/n
    (5, 10, 0.23659, 0.76341),
    (10, 10, 0.72247, 1.0),
    (81, 263, 0.25529, 0.36621),
    (1, 1, 0.20655, 1.0),
])
def test_wilson_matches_known_values(k, n, lo, hi):
    got = wilson(k, n)
    assert got == pytest.approx((lo, hi), abs=1e-5)


def test_wilson_of_nothing_is_none():
    assert wilson(0, 0) is None


def row(cell="async 0ms", task=0, episode=0, success=False, ages=(50.0,), ticks=10, fresh=8, steps=10, error=None):
    return {"cell": cell, "task": task, "episode": episode, "success": success, "steps": steps, "error": error,
            "ticks": ticks, "fresh": fresh, "action_ages_ms": list(ages), "policy": "fake policy", "sim": "fake sim"}


def test_aggregate_pools_ticks_and_ages_and_sets_errors_apart():
    rows = [row(success=True, ages=[10, 20, 30], ticks=10, fresh=10, steps=4),
            row(episode=1, ages=[100], ticks=30, fresh=6, steps=12),
            {"cell": "async 0ms", "task": 0, "episode": 2, "success": False, "error": "worker: died"}]
    a = aggregate(rows)
    assert (a["episodes"], a["successes"], a["errors"]) == (2, 1, 1)
    assert a["success_rate"] == 0.5 and a["ci95"] == pytest.approx(wilson(1, 2))
    assert a["fresh_fraction"] == pytest.approx(16 / 40)  # pooled over ticks, not a mean of fractions
    assert a["action_age_p50_s"] == pytest.approx(0.025)  # median of 10, 20, 30, 100 ms
    assert a["steps_mean"] == 8.0


def test_aggregate_of_no_rows_has_no_figures():
    a = aggregate([])
    assert a["episodes"] == 0 and a["success_rate"] is None and a["ci95"] is None and a["action_age_p50_s"] is None


def test_group_by_cell():
    groups = group_by([row(success=True), row(cell="sync 0ms"), row(cell="sync 0ms", episode=1, success=True)],
                      lambda r: r["cell"])
    assert groups["async 0ms"]["success_rate"] == 1.0 and groups["sync 0ms"]["successes"] == 1


def test_parse_ids_latencies_modes():
    assert grid.parse_ids("0-3,7,2", "--tasks") == [0, 1, 2, 3, 7]
    assert grid.parse_latencies("0,0.05,0.1") == [0.0, 0.05, 0.1]
    assert grid.parse_modes("sync,async") == ["sync", "async"]
    for bad in (lambda: grid.parse_ids("3-1", "--tasks"), lambda: grid.parse_ids("a", "--tasks"),
                lambda: grid.parse_latencies("0,-0.1"), lambda: grid.parse_latencies("fast"),
                lambda: grid.parse_modes("async,turbo")):
        with pytest.raises(InputError):
            bad()


def test_sweep_cells_and_keys():
    cells = grid.sweep_cells([0.0, 0.05], {}, ["async", "sync"], {"rate": 20.0}, {})
    assert list(cells) == ["async 0ms", "async 50ms", "sync 0ms", "sync 50ms"]
    assert cells["sync 50ms"]["run"] == {"rate": 20.0, "sync": True, "inject_delay": 0.05}
    profiled = grid.sweep_cells([], {"bench.json:compiled+fp8": 0.024}, ["sync"], {"rate": 20.0},
                                {"latency_scale": 2.0})
    assert profiled == {"sync bench:compiled+fp8": {
        "mode": "sync", "latency_profile": "bench.json:compiled+fp8", "latency_p50_s": 0.024,
        "run": {"rate": 20.0, "latency_scale": 2.0, "sync": True, "latency_profile": "bench.json:compiled+fp8"}}}
    keys = grid.episode_keys(cells, [0, 1], [0, 1])
    assert len(keys) == 16 and keys[:3] == [("async 0ms", 0, 0), ("async 0ms", 0, 1), ("async 0ms", 1, 0)]


GRID = {"cells": grid.sweep_cells([0.0], {}, ["async"], {"rate": 20.0}, {})}


def test_results_file_resumes_and_retries_errors(tmp_path):
    path = tmp_path / "results.jsonl"
    results = ResultsFile(path, GRID)
    results.append(row(episode=0, success=True))
    results.append({"cell": "async 0ms", "task": 0, "episode": 1, "success": False, "error": "sim: boom"})
    results.close()
    again = ResultsFile(path, GRID)
    assert again.done() == {("async 0ms", 0, 0)}  # the error row is run again
    again.append(row(episode=1))
    again.close()
    assert ResultsFile(path, GRID).done() == {("async 0ms", 0, 0), ("async 0ms", 0, 1)}


def test_results_file_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "results.jsonl"
    results = ResultsFile(path, GRID)
    results.append(row(episode=0))
    results.close()
    with path.open("a") as f:
        f.write('{"cell": "async 0ms", "task": 0, "epis')  # killed mid-write
    again = ResultsFile(path, GRID)
    again.append(row(episode=1))
    again.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line) for line in lines)


def test_results_file_of_another_grid_is_refused(tmp_path):
    path = tmp_path / "results.jsonl"
    ResultsFile(path, GRID).close()
    other = {"cells": grid.sweep_cells([0.0], {}, ["async"], {"rate": 10.0}, {})}
    with pytest.raises(InputError, match=r"different grid \(cell 'async 0ms' has rate=20.0 there, 10.0 here\)"):
        ResultsFile(path, other)
    more = {"cells": grid.sweep_cells([0.0, 0.1], {}, ["async"], {"rate": 20.0}, {})}
    with pytest.raises(InputError, match="its cells are async 0ms; this run's are async 0ms, async 100ms"):
        ResultsFile(path, more)
    (tmp_path / "notes.jsonl").write_text('{"kind": "tick"}\n')
    with pytest.raises(InputError, match="not a results file"):
        ResultsFile(tmp_path / "notes.jsonl", GRID)


def test_sweep_tables_and_plot(tmp_path):
    cells = grid.sweep_cells([0.0, 0.1], {"profiles/latency/h200-compiled.json": 0.036}, ["async", "sync"], {}, {"latency_order": "iid"})
    rows = [row(cell=c, episode=e, success=(c == "sync 100ms" or e == 0), task=t)
            for c in cells for t in (0, 1) for e in (0, 1)]
    md, doc = report.sweep_tables(cells, rows, ["a note"])
    assert "| sync | 100 ms | 4 | 100% (4/4) | 51-100% | 80% | 50 / 50 | 10.0 | 0 |" in md
    assert "| async | 0 ms | 4 | 50% (2/4) | 15-85% |" in md
    assert "- policy: fake policy" in md and "- a note" in md
    assert "| sync | profiles/latency/h200-compiled.json (p50 36 ms) | 4 |" in md
    by_name = {c["cell"]: c for c in doc["cells"]}
    assert by_name["async 100ms"]["per_task"]["1"]["episodes"] == 2
    report.plot_success_vs_latency(doc, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_table_per_task_with_total_and_throughput():
    rows = [row(cell="eval", task=t, episode=e, success=(t == 3)) | {"instruction": f"task {t} words"}
            for t in (0, 3) for e in range(4)]
    throughput = {"episodes": 8, "wall_s": 36.0, "envs": 2, "runner": "fleet", "episodes_per_hour": 800.0,
                  "setup_s": 12.0, "running_s": 24.0, "episodes_per_hour_running": 1200.0}
    md, doc = report.eval_tables(rows, [], throughput, {"sampled": False, "reason": "the policy runs on cpu"})
    assert "| 3 | task 3 words | 4 | 100% (4/4) | 51-100% |" in md
    assert "| **all** |  | 8 | 50% (4/8) |" in md and "800 episodes per hour" in md
    assert "1200 per hour over the 24.0 s after the 12.0 s setup" in md
    assert "GPU utilisation: n/a (the policy runs on cpu)." in md and doc["gpu"]["sampled"] is False
    assert [t["task"] for t in doc["tasks"]] == [0, 3] and doc["total"]["successes"] == 4


def test_alerts_are_listed_once_per_kind_with_the_episodes_that_raised_them():
    """A stale action's message names its own age and step: 31 episodes must not make 31 lines."""
    rows = [row(episode=e) | {"alerts": [f"stale_action: 1.0{e} s old at step {e}", "constant_action: the same"]}
            for e in range(3)] + [row(episode=3) | {"alerts": ["gc_pause: 1300 ms", "gc_pause: 1800 ms"]}]
    lines = [line for line in report.alert_lines(rows) if line.startswith("- ")]
    assert lines == ["- SILENT FAILURE? stale_action: 1.00 s old at step 0 (3 episodes)",
                     "- SILENT FAILURE? constant_action: the same (3 episodes)",
                     "- SILENT FAILURE? gc_pause: 1300 ms (1 episodes)"]
    assert report.alert_lines([row()]) == []


def test_a_spec_the_runtime_cannot_take_costs_its_episodes_an_error_row():
    """Through real spawn workers: the failure is recorded per episode, the pool goes on and ends."""
    rows = []
    run_episodes({"c": {"cell": "c", "run": {"no_such_option": 1}}}, [("c", 0, 0), ("c", 0, 1)], 1, rows.append)
    assert [(r["episode"], r["success"]) for r in rows] == [(0, False), (1, False)]
    assert all(r["error"] == "input: `rtloop run` has no option --no-such-option" for r in rows)


def test_a_profile_cell_that_always_succeeds_plots(tmp_path):
    """Wilson's upper end of 30/30 is 0.9999999999999999 in floats: its error bar must not go negative."""
    cells = grid.sweep_cells([], {"profiles/latency/h200-compiled.json": 0.036}, ["async"], {}, {"latency_order": "iid"})
    rows = [row(cell=c, episode=e, success=True, task=0) for c in cells for e in range(30)]
    _, doc = report.sweep_tables(cells, rows, [])
    report.plot_success_vs_latency(doc, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
