"""The Prometheus sink and its HTTP server, driven with records directly (the live run is in
test_live_prometheus.py)."""

from __future__ import annotations

import socket
import threading
import urllib.request

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from rtloop.errors import MetricsError
from rtloop.metrics.exporter import MAX_KINDS, PrometheusSink, start_metrics_server
from rtloop.runtime.records import AlertRecord, EpisodeRecord, ErrorRecord, InferenceRecord, RunRecord, TickRecord

RUN = {"rate": 20.0, "suite": "libero_object", "task": 3, "engine": "graphed", "sync": False,
       "policy": "openvla tiny, RANDOM WEIGHTS", "random_weights": True}
LABELS = {"suite": "libero_object", "task": "3", "engine": "graphed"}


def tick(step: int, source: str = "fresh", dropped: int = 0, overrun: float = 0.0, age: float | None = 0.12):
    return TickRecord(
        episode=0, step=step, t_start=10.0 + step * 0.05, t_end=10.04 + step * 0.05, deadline=10.0 + step * 0.05,
        interval_s=None if step == 0 else 0.05, overrun_s=overrun, lateness_s=0.0004, step_s=0.045,
        physics_s=0.002, render_s=0.04, action_source=source, action_seq=None if source == "dummy" else step,
        action_age_s=age, frame_seq=step, frames_dropped_total=dropped, done=False, success=False,
    )


def inference(seq: int) -> InferenceRecord:
    return InferenceRecord(
        episode=0, seq=seq, frame_seq=seq, frame_time=9.9, t_start=10.0, t_end=10.03, queue_wait_s=0.001,
        frame_age_s=0.1, stages={"processor": 0.002, "libero_image": 0.0015, "generate": 0.027, "detokenize": 0.0001},
    )


def samples(sink: PrometheusSink) -> dict[tuple, float]:
    """{(sample name, frozenset(labels)): value}, from the same text Prometheus scrapes."""
    text = generate_latest(sink.registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(sink: PrometheusSink, name: str, **extra) -> float:
    return samples(sink)[(name, frozenset({**LABELS, **extra}.items()))]


def test_records_become_metrics():
    sink = PrometheusSink()
    sink.on_record(RunRecord(RUN))
    sink.on_record(tick(0, "dummy", age=None))
    sink.on_record(tick(1, "fresh", dropped=2))
    sink.on_record(tick(2, "held", dropped=2, overrun=0.01))
    sink.on_record(tick(3, "fresh", dropped=5))
    sink.on_record(tick(4, "stop", dropped=5, age=1.2))
    for seq in range(2):
        sink.on_record(inference(seq))
    sink.on_record(EpisodeRecord(0, "libero_object", 3, 10.0, 12.0, 4, success=True))
    sink.on_record(EpisodeRecord(1, "libero_object", 3, 12.0, 14.0, 4, success=False))

    assert value(sink, "rtloop_ticks_total") == 5
    assert value(sink, "rtloop_actions_total", source="fresh") == 2
    assert value(sink, "rtloop_actions_total", source="held") == 1
    assert value(sink, "rtloop_actions_total", source="dummy") == 1
    assert value(sink, "rtloop_actions_total", source="stop") == 1  # a stale action: the arm stopped
    assert value(sink, "rtloop_frames_dropped_total") == 5  # running total 0, 2, 2, 5, 5 -> increments
    assert value(sink, "rtloop_tick_overruns_total") == 1
    assert value(sink, "rtloop_tick_interval_seconds_count") == 4  # the first tick has no interval
    assert value(sink, "rtloop_action_age_seconds_count") == 4  # no age for the dummy action
    assert value(sink, "rtloop_tick_lateness_seconds_count") == 5
    assert value(sink, "rtloop_inferences_total") == 2
    assert value(sink, "rtloop_stage_duration_seconds_count", stage="generate") == 2
    assert value(sink, "rtloop_stage_duration_seconds_sum", stage="generate") == pytest.approx(0.054)
    assert value(sink, "rtloop_stage_duration_seconds_count", stage="render") == 5
    assert value(sink, "rtloop_stage_duration_seconds_sum", stage="libero_image") == pytest.approx(0.003)
    assert value(sink, "rtloop_stage_duration_seconds_bucket", stage="render", le="0.04") == 5
    assert value(sink, "rtloop_stage_duration_seconds_bucket", stage="render", le="0.03") == 0
    assert value(sink, "rtloop_frame_age_seconds_count") == 2
    assert value(sink, "rtloop_episodes_total") == 2
    assert value(sink, "rtloop_episode_successes_total") == 1
    assert value(sink, "rtloop_current_step") == 4
    assert value(sink, "rtloop_configured_rate_hertz") == 20
    assert value(sink, "rtloop_gpu_memory_allocated_bytes") == 0  # a CPU run
    assert value(sink, "rtloop_run_info", policy="random", mode="async") == 1


def test_every_series_exists_at_zero_from_the_start():
    """Dashboards show 0, not 'no data', before the first error, drop or episode."""
    sink = PrometheusSink()
    sink.on_record(RunRecord({**RUN, "random_weights": False, "sync": True}))
    assert value(sink, "rtloop_errors_total", kind="sim") == 0
    assert value(sink, "rtloop_errors_total", kind="policy") == 0
    assert value(sink, "rtloop_alerts_total", kind="constant_action") == 0
    assert value(sink, "rtloop_frames_dropped_total") == 0
    assert value(sink, "rtloop_episodes_total") == 0
    assert value(sink, "rtloop_stage_duration_seconds_count", stage="detokenize") == 0
    assert value(sink, "rtloop_actions_total", source="held") == 0
    assert value(sink, "rtloop_run_info", policy="real", mode="sync") == 1


def test_errors_and_alerts_are_counted_by_bounded_kind():
    sink = PrometheusSink()
    sink.on_record(RunRecord(RUN))
    sink.on_record(ErrorRecord("sim", "MuJoCo went unstable", 0.0))
    sink.on_record(ErrorRecord("SimError", "again", 0.0))  # normalised to a label-safe value
    sink.on_record(AlertRecord("constant_action", "same action for 10 frames", 0.0))
    for i in range(3 * MAX_KINDS):
        sink.on_record(ErrorRecord(f"made up {i}", "", 0.0))
    assert value(sink, "rtloop_errors_total", kind="sim") == 1
    assert value(sink, "rtloop_errors_total", kind="simerror") == 1
    assert value(sink, "rtloop_alerts_total", kind="constant_action") == 1
    kinds = {dict(labels)["kind"] for name, labels in samples(sink) if name == "rtloop_errors_total"}
    assert len(kinds) <= MAX_KINDS + 1  # + "other", where everything past the cap goes
    assert value(sink, "rtloop_errors_total", kind="other") > 0


def test_naming_follows_prometheus_conventions():
    sink = PrometheusSink()
    sink.on_record(RunRecord(RUN))
    for family in sink.registry.collect():
        assert family.name.startswith("rtloop_"), family.name
        if family.type == "counter":
            assert any(s.name == family.name + "_total" for s in family.samples), family.name
        if family.type == "histogram":  # durations in seconds; the batch size is a count of frames
            assert family.name.endswith("_seconds") or family.name == "rtloop_inference_batch_size", family.name
        if family.type == "gauge":
            assert family.name.endswith(("_hertz", "_bytes", "_info", "_episode", "_step", "_envs")), family.name
        for s in family.samples:
            assert set(s.labels) <= {"suite", "task", "engine", "stage", "source", "kind", "le", "policy", "mode",
                                     "env"}


def test_fleet_series_per_env_are_bounded_by_the_fleet_size():
    sink = PrometheusSink()
    sink.on_record(RunRecord({**RUN, "envs": 3}))
    for env, (source, dropped) in enumerate([("fresh", 1), ("held", 4), ("fresh", 0)]):
        rec = tick(5, source=source, dropped=dropped)
        rec.env = env
        sink.on_record(rec)
    for i in range(3):  # one batch of 3 frames, then a batch of 1
        sink.on_record(InferenceRecord(episode=0, seq=i, frame_seq=i, frame_time=0.0, t_start=0.1, t_end=0.2,
                                          queue_wait_s=0.0, frame_age_s=0.1, env=i, batch_size=3, batch_index=i))
    sink.on_record(InferenceRecord(episode=0, seq=3, frame_seq=3, frame_time=0.0, t_start=0.3, t_end=0.4,
                                      queue_wait_s=0.0, frame_age_s=0.1, env=1, batch_size=1, batch_index=0))
    assert value(sink, "rtloop_fleet_envs") == 3
    envs = {dict(labels)["env"] for name, labels in samples(sink) if name == "rtloop_env_actions_total"}
    assert envs == {"0", "1", "2"}
    assert value(sink, "rtloop_env_actions_total", env="1", source="held") == 1
    assert value(sink, "rtloop_env_actions_total", env="1", source="fresh") == 0
    assert value(sink, "rtloop_frames_dropped_total") == 5  # each env's own running total, summed
    assert value(sink, "rtloop_inference_batch_size_count") == 2  # batches, not frames
    assert value(sink, "rtloop_inference_batch_size_sum") == 4


def test_two_sinks_do_not_share_metrics():
    a, b = PrometheusSink(), PrometheusSink()
    a.on_record(RunRecord(RUN))
    b.on_record(RunRecord(RUN))
    a.on_record(tick(0))
    assert value(a, "rtloop_ticks_total") == 1
    assert value(b, "rtloop_ticks_total") == 0


def test_a_record_before_run_start_is_a_bug():
    with pytest.raises(RuntimeError, match="the run record must come before"):
        PrometheusSink().on_record(tick(0))


def test_server_serves_the_registry_and_closes_cleanly():
    sink = PrometheusSink()
    sink.on_record(RunRecord(RUN))
    sink.on_record(tick(0))
    before = set(threading.enumerate())
    server = start_metrics_server(0, sink.registry)
    assert server.addr == "127.0.0.1" and server.port > 0
    with urllib.request.urlopen(server.url, timeout=5) as resp:
        body = resp.read().decode()
    assert 'rtloop_ticks_total{engine="graphed",suite="libero_object",task="3"} 1.0' in body
    server.close()
    assert set(threading.enumerate()) <= before  # no thread left behind
    start_metrics_server(server.port, sink.registry).close()  # the port is free again for the next run


def test_port_in_use_is_a_one_line_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsError) as err:
            start_metrics_server(port, PrometheusSink().registry)
    message = str(err.value)
    assert "\n" not in message and str(port) in message and "--metrics-port" in message


def test_port_out_of_range_is_a_one_line_error():
    with pytest.raises(MetricsError, match="out of range"):
        start_metrics_server(70000, PrometheusSink().registry)
