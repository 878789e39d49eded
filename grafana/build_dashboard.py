"""Generate grafana/dashboards/rtloop.json with Grafana's own SDK (grafana-foundation-sdk).

    python grafana/build_dashboard.py          # rewrite the committed JSON
    python grafana/build_dashboard.py --check  # exit 1 if the committed JSON is out of date

Every query reads metrics from rtloop.metrics.exporter; tests/metrics evaluates each of them against a real
Prometheus scraping a live `rtloop run`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import common, dashboard, prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import LegendDisplayMode, LegendPlacement, TooltipDisplayMode
from grafana_foundation_sdk.models.dashboard import DashboardCursorSync, DataSourceRef, VariableOption, VariableRefresh
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

OUT = Path(__file__).parent / "dashboards" / "rtloop.json"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="prometheus")  # provisioned with this uid
# Every rtloop series carries these three labels; the dashboard's variables filter on them.
SEL = 'suite=~"$suite", task=~"$task", engine=~"$engine"'
WINDOW = "$__rate_interval"
# `rtloop serve`'s series carry only `engine`; its panels live in the row named SERVER_ROW.
SERVER_SEL = 'engine=~"$engine"'
SERVER_ROW = "Policy server (rtloop serve)"


def query(expr: str, legend: str = "", instant: bool = False) -> prometheus.Dataquery:
    q = prometheus.Dataquery().expr(expr).legend_format(legend or "__auto").datasource(DATASOURCE)
    return q.instant() if instant else q.range()


def quantile(q: float, metric: str, extra: str = "", by: str = "") -> str:
    sel = f"{SEL}, {extra}" if extra else SEL
    group = f"{by}, le" if by else "le"
    return f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{sel}}}[{WINDOW}])))"


def graph(title: str, unit: str, queries: list[prometheus.Dataquery], description: str, width: int = 12):
    panel = timeseries.Panel().title(title).description(description).unit(unit).datasource(DATASOURCE)
    panel = panel.span(width).height(8).line_width(1).fill_opacity(5).show_points("never")
    panel = panel.legend(common.VizLegendOptions().display_mode(LegendDisplayMode.LIST)
                         .placement(LegendPlacement.BOTTOM).show_legend(True))
    panel = panel.tooltip(common.VizTooltipOptions().mode(TooltipDisplayMode.MULTI))
    for i, q in enumerate(queries):
        panel = panel.with_target(q.ref_id(chr(ord("A") + i)))
    return panel


def single(title: str, unit: str, expr: str, description: str, width: int = 4):
    return (
        stat.Panel().title(title).description(description).unit(unit).datasource(DATASOURCE)
        .span(width).height(4).with_target(query(expr, instant=True).ref_id("A"))
        .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )


def rate_of(counter: str, extra: str = "") -> str:
    sel = f"{SEL}, {extra}" if extra else SEL
    return f"sum(rate({counter}{{{sel}}}[{WINDOW}]))"


def variable(name: str, query_text: str) -> dashboard.QueryVariable:
    return (
        dashboard.QueryVariable(name).label(name).datasource(DATASOURCE).query(query_text)
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).include_all(True).all_value(".*").multi(True)
        .current(VariableOption(selected=True, text="All", value="$__all"))
    )


def percentiles(metric: str, name: str, extra: str = "") -> list[prometheus.Dataquery]:
    return [query(quantile(q, metric, extra), f"{name} p{round(q * 100)}") for q in (0.5, 0.95, 0.99)]


def build() -> dashboard.Dashboard:
    all_actions = rate_of("rtloop_actions_total")
    fresh_ratio = rate_of("rtloop_actions_total", 'source="fresh"') + " / " + all_actions
    held_ratio = rate_of("rtloop_actions_total", 'source="held"') + " / " + all_actions
    d = (
        dashboard.Dashboard("rtloop: real-time loop").uid("rtloop").tags(["rtloop"]).refresh("5s")
        .time("now-15m", "now").timezone("browser").readonly().tooltip(DashboardCursorSync.CROSSHAIR)
        .description("OpenVLA driving LIBERO in real time: where each tick's time goes. Metrics from rtloop run.")
        .with_variable(variable("suite", "label_values(rtloop_run_info, suite)"))
        .with_variable(variable("task", 'label_values(rtloop_run_info{suite=~"$suite"}, task)'))
        .with_variable(variable("engine", 'label_values({__name__=~"rtloop_run_info|rtloop_server_info"}, engine)'))
    )

    d = d.with_row(dashboard.Row("Run"))
    d = d.with_panel(single(
        "Success rate", "percentunit",
        f"sum(rtloop_episode_successes_total{{{SEL}}}) / sum(rtloop_episodes_total{{{SEL}}})",
        "Episodes that succeeded / episodes finished, since the run started (empty until one finishes)."))
    d = d.with_panel(single("Episodes finished", "none", f"sum(rtloop_episodes_total{{{SEL}}})",
                            "Episodes finished since the run started."))
    d = d.with_panel(single("Episode", "none", f"max(rtloop_current_episode{{{SEL}}})", "Episode in progress."))
    d = d.with_panel(single("Step", "none", f"max(rtloop_current_step{{{SEL}}})",
                            "Last policy step ticked in the current episode."))
    d = d.with_panel(single("Configured rate", "hertz", f"max(rtloop_configured_rate_hertz{{{SEL}}})",
                            "The --rate the sim was asked to tick at."))
    d = d.with_panel(single("Fresh actions", "percentunit", fresh_ratio,
                            "Share of ticks that applied a new action (not a held or dummy one)."))

    d = d.with_row(dashboard.Row("Stage latency (p50 / p95 / p99)"))
    stages = [
        ("processor", "Image + prompt preprocessing for the model."),
        ("libero_image", "Inside processor: the LIBERO frame preparation (rotation, JPEG round trip, resize, "
                         "crop), on several threads for a fleet's batch."),
        ("generate", "The model: vision towers, prefill and 7 action-token decode steps."),
        ("detokenize", "Action tokens to the env-ready 7-vector."),
        ("step", "env.step wall time, physics and render included."),
        ("render", "Rendering the camera inside env.step."),
        ("physics", "MuJoCo physics inside env.step."),
    ]
    for stage, what in stages:
        d = d.with_panel(graph(f"{stage}", "s", percentiles("rtloop_stage_duration_seconds", stage,
                                                            f'stage="{stage}"'), what, width=8))

    d = d.with_row(dashboard.Row("Loop"))
    d = d.with_panel(graph("Achieved sim and inference rate", "hertz", [
        query(rate_of("rtloop_ticks_total"), "sim ticks"),
        query(rate_of("rtloop_inferences_total"), "inferences"),
        query(f"max(rtloop_configured_rate_hertz{{{SEL}}})", "configured rate"),
    ], "Ticks and completed inferences per second, against the configured rate."))
    d = d.with_panel(graph("Actions by source", "percentunit", [
        query(fresh_ratio, "fresh"),
        query(held_ratio, "held"),
    ], "Share of ticks applying a fresh action (first use of a new one) or holding the previous one."))
    d = d.with_panel(graph("Frame and action age", "s", [
        query(quantile(0.5, "rtloop_frame_age_seconds"), "frame age p50"),
        query(quantile(0.95, "rtloop_frame_age_seconds"), "frame age p95"),
        query(quantile(0.5, "rtloop_action_age_seconds"), "action age p50"),
        query(quantile(0.95, "rtloop_action_age_seconds"), "action age p95"),
    ], "Frame age: how old a frame is when inference starts on it. Action age: how old the frame behind the "
       "applied action is when the sim applies it (staleness)."))
    d = d.with_panel(graph("Tick timing", "s", [
        query(quantile(0.5, "rtloop_tick_interval_seconds"), "interval p50"),
        query(quantile(0.99, "rtloop_tick_interval_seconds"), "interval p99"),
        *percentiles("rtloop_tick_lateness_seconds", "lateness"),
        query(quantile(0.99, "rtloop_tick_overrun_seconds"), "overrun p99"),
    ], "Interval between tick starts; lateness = start minus deadline (jitter); overrun = time past budget."))
    d = d.with_panel(graph("Overruns and dropped frames", "ops", [
        query(rate_of("rtloop_tick_overruns_total"), "overrunning ticks/s"),
        query(rate_of("rtloop_frames_dropped_total"), "dropped frames/s"),
    ], "Ticks that ran past their budget, and frames overwritten unread in the mailbox, per second."))
    d = d.with_panel(graph("Inference queue wait and total", "s", [
        query(quantile(0.5, "rtloop_queue_wait_seconds"), "queue wait p50"),
        query(quantile(0.95, "rtloop_queue_wait_seconds"), "queue wait p95"),
        query(quantile(0.5, "rtloop_inference_duration_seconds"), "predict_action p50"),
        query(quantile(0.95, "rtloop_inference_duration_seconds"), "predict_action p95"),
    ], "Time the inference task waited for a new frame, and the whole predict_action call."))

    d = d.with_row(dashboard.Row("Fleet (rtloop run --envs N)"))
    d = d.with_panel(single("Envs", "none", f"max(rtloop_fleet_envs{{{SEL}}})",
                            "Envs in the fleet, each in its own worker (1: a single-env run).", width=4))
    batch_mean = (f"sum(rate(rtloop_inference_batch_size_sum{{{SEL}}}[{WINDOW}])) / "
                  f"sum(rate(rtloop_inference_batch_size_count{{{SEL}}}[{WINDOW}]))")
    d = d.with_panel(graph("Batch size", "none", [
        query(batch_mean, "mean"),
        query(quantile(0.5, "rtloop_inference_batch_size"), "p50"),
        query(quantile(0.95, "rtloop_inference_batch_size"), "p95"),
    ], "Frames per policy call: the inference task takes the newest unread frame of every env that has one "
       "(up to 32). Quantiles interpolate between the 1, 2, 4, 8, 16, 32 buckets.", width=10))
    d = d.with_panel(graph("Frames and batches per second", "ops", [
        query(rate_of("rtloop_inferences_total"), "frames"),
        query(rate_of("rtloop_inference_batch_size_count"), "batches"),
    ], "Frames the policy answered and policy calls, per second, over the whole fleet.", width=10))
    env_fresh = (f"sum by (env) (rate(rtloop_env_actions_total{{{SEL}, source=\"fresh\"}}[{WINDOW}])) / "
                 f"sum by (env) (rate(rtloop_env_actions_total{{{SEL}}}[{WINDOW}]))")
    d = d.with_panel(graph("Fresh actions per env", "percentunit", [query(env_fresh, "env {{env}}")],
                           "Share of each env's ticks that applied a new action.", width=12))
    d = d.with_panel(graph("Action age p99 per env", "s", [
        query(quantile(0.99, "rtloop_env_action_age_seconds", by="env"), "env {{env}}"),
    ], "How old the frame behind each env's applied action is, p99 per env.", width=12))

    d = d.with_row(dashboard.Row("Resources and failures"))
    d = d.with_panel(graph("GPU memory", "bytes", [
        query(f"sum(rtloop_gpu_memory_allocated_bytes{{{SEL}}})", "allocated"),
        query(f"sum(rtloop_gpu_memory_reserved_bytes{{{SEL}}})", "reserved"),
    ], "torch.cuda memory allocated and reserved by the caching allocator; 0 on a CPU run.", width=8))
    d = d.with_panel(graph("Errors and silent-failure alerts", "none", [
        query(f"sum by (kind) (rtloop_errors_total{{{SEL}}})", "error {{kind}}"),
        query(f"sum by (kind) (rtloop_alerts_total{{{SEL}}})", "alert {{kind}}"),
    ], "Totals since the run started, by kind. Alerts are failures that raise nothing (see the run's log).",
        width=8))
    d = d.with_panel(
        table.Panel().title("Runs").description("One row per scraped run: its suite, task, engine, policy weights "
                                                "(random or real) and mode (async or sync).")
        .datasource(DATASOURCE).span(8).height(8)
        .with_target(query(f"rtloop_run_info{{{SEL}}}", instant=True).ref_id("A")
                     .format(PromQueryFormat.TABLE))
    )

    d = d.with_row(dashboard.Row(SERVER_ROW))
    server_rate = f"sum by (form) (rate(rtloop_server_requests_total{{{SERVER_SEL}}}[{WINDOW}]))"
    d = d.with_panel(graph("Server requests", "reqps", [query(server_rate, "{{form}}")],
                           "Requests answered with actions per second, by request form (openpi's keys or "
                           "rtloop's raw frame).", width=8))
    d = d.with_panel(graph("Server latency per stage", "s", [
        query(f"histogram_quantile({q}, sum by (stage, le) (rate(rtloop_server_stage_duration_seconds_bucket"
              f"{{{SERVER_SEL}, stage=~\"request|decode|queue|infer|encode\"}}[{WINDOW}])))", f"{{{{stage}}}} p{p}")
        for q, p in ((0.5, 50), (0.99, 99))
    ], "request: message in to reply out; decode: msgpack + validation; queue: waiting for the inference "
       "thread; infer: the model; encode: the reply.", width=8))
    d = d.with_panel(graph("Server batch size and connections", "none", [
        query(f"sum(rate(rtloop_server_batch_size_sum{{{SERVER_SEL}}}[{WINDOW}])) / "
              f"sum(rate(rtloop_server_batch_size_count{{{SERVER_SEL}}}[{WINDOW}]))", "mean batch"),
        query(f"sum(rtloop_server_connections{{{SERVER_SEL}}})", "open connections"),
        query(f"sum(rtloop_server_requests_waiting{{{SERVER_SEL}}})", "requests waiting"),
    ], "Requests per model call (those that arrived while the model was busy, up to --max-batch), open client "
       "connections, and requests waiting for the model now.", width=8))
    d = d.with_panel(graph("Server errors", "none", [
        query(f"sum by (kind) (rtloop_server_errors_total{{{SERVER_SEL}}})", "{{kind}}"),
    ], "Refused requests and dropped connections since the server started, by kind (malformed, oversize, "
       "missing_key, ..., auth, disconnected).", width=12))
    d = d.with_panel(
        table.Panel().title("Servers").description("One row per scraped rtloop serve: engine and weights.")
        .datasource(DATASOURCE).span(12).height(8)
        .with_target(query(f"rtloop_server_info{{{SERVER_SEL}}}", instant=True).ref_id("A")
                     .format(PromQueryFormat.TABLE))
    )
    return d


def render() -> str:
    model = build().build()
    for i, panel in enumerate(model.panels, start=1):  # stable, unique ids (Grafana links panels by id)
        panel.id_val = i
    return json.dumps(model, cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed JSON differs")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python grafana/build_dashboard.py", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
