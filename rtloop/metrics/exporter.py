"""Prometheus metrics for a running loop: a Sink that turns records into prometheus-client metrics, and the
HTTP server that exposes them for scraping.

Conventions (https://prometheus.io/docs/practices/naming/): every name starts with `rtloop_`, durations are
in seconds, counters end in `_total`. Every rtloop series carries the same three bounded labels, `suite`,
`task` and `engine`, fixed for the life of a run, so several runs scraped by one Prometheus can be told apart
and the dashboard can filter by them. `rtloop_run_info` carries the rest of what describes a run.

The sink only does in-memory arithmetic (a few microseconds per record); all text formatting happens in the
HTTP server's thread when Prometheus scrapes.
"""

from __future__ import annotations

import re
import sys
import threading
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import start_http_server

from rtloop import errors
from rtloop.errors import MetricsError
from rtloop.policy.base import ALERT_KINDS, STAGES, SUB_STAGES
from rtloop.policy.buckets import BATCH_BUCKETS
from rtloop.runtime.records import (ACTION_SOURCES, AlertRecord, EpisodeRecord, ErrorRecord, InferenceRecord,
                                    Record, RunRecord, TickRecord)

# Tuned for 1 ms .. 1 s, dense around a 20 Hz tick (50 ms) and a 10 Hz one, with sub-millisecond buckets for
# tick lateness (jitter is usually well under 1 ms) and a tail for CPU runs of the full model.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05,
    0.06, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0,
)

SIM_STAGES = ("step", "render", "physics")
RUN_LABELS = ("suite", "task", "engine")

# Error and alert kinds become label values; anything beyond this many distinct kinds is counted as "other",
# so a misbehaving caller cannot blow up the series count.
MAX_KINDS = 16
_KIND_RE = re.compile(r"[^a-z0-9_]+")


def _error_kinds() -> list[str]:
    """The kinds of every RtloopError subclass, so their counters exist (at 0) from the start."""
    kinds, todo = set(), [errors.RtloopError]
    while todo:
        cls = todo.pop()
        kinds.add(cls.kind)
        todo.extend(cls.__subclasses__())
    return sorted(kinds)


def policy_kind(info: dict) -> str:
    """'random' or 'real' weights, or 'expert' / 'remote': the one fact about the policy worth a label (its
    full label is unbounded)."""
    if info.get("policy_kind") in ("expert", "remote"):
        return info["policy_kind"]
    if "random_weights" in info:
        return "random" if info["random_weights"] else "real"
    return "random" if "random" in str(info.get("policy", "")).lower() else "real"


def _gpu_bytes(reading: str) -> float:
    """torch.cuda memory in use, read at scrape time. 0 when torch was never imported or CUDA never
    initialised (a CPU run): no GPU memory is in use then. Never initialises CUDA itself."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return 0.0
    return float(getattr(torch.cuda, reading)())


class PrometheusSink:
    """Implements rtloop.runtime.records.Sink. One sink, one CollectorRegistry: nothing global, so tests and
    several sinks in one process never collide."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = r = registry or CollectorRegistry()
        L = RUN_LABELS

        def gauge(name, doc, extra=()):
            return Gauge(name, doc, [*L, *extra], registry=r)

        def counter(name, doc, extra=()):
            return Counter(name, doc, [*L, *extra], registry=r)  # exposed as name + "_total"

        def histogram(name, doc, extra=()):
            return Histogram(name, doc, [*L, *extra], registry=r, buckets=LATENCY_BUCKETS)

        # Metric families, labelled by run; the run record binds the run's labels once so a record costs
        # only the observations themselves.
        self._run_info = gauge("rtloop_run_info", "Always 1; labels describe the run", ["policy", "mode"])
        self._rate = gauge("rtloop_configured_rate_hertz", "Tick rate the sim was asked to run at")
        self._episode = gauge("rtloop_current_episode", "Episode in progress (0-based)")
        self._step = gauge("rtloop_current_step", "Last policy step ticked in the current episode")
        self._gpu_allocated = gauge("rtloop_gpu_memory_allocated_bytes", "torch.cuda.memory_allocated(); 0 on CPU")
        self._gpu_reserved = gauge("rtloop_gpu_memory_reserved_bytes", "torch.cuda.memory_reserved(); 0 on CPU")

        self._stage = histogram("rtloop_stage_duration_seconds", "Time spent in each stage", ["stage"])
        self._inference = histogram("rtloop_inference_duration_seconds", "Whole predict_action call")
        self._interval = histogram("rtloop_tick_interval_seconds", "Time between the starts of two ticks")
        self._overrun = histogram("rtloop_tick_overrun_seconds", "How far a tick ran past its budget (0 if fit)")
        self._lateness = histogram("rtloop_tick_lateness_seconds", "Tick start minus its deadline (jitter)")
        self._queue_wait = histogram("rtloop_queue_wait_seconds", "Inference task waiting for a new frame")
        self._frame_age = histogram("rtloop_frame_age_seconds", "Age of the frame when inference starts on it")
        self._action_age = histogram(
            "rtloop_action_age_seconds", "Tick start minus the capture time of the applied action's frame"
        )

        # The fleet (rtloop run --envs N): per-env series carry an `env` label, "0".."N-1", so their number
        # is bounded by N.
        self._envs = gauge("rtloop_fleet_envs", "Envs in the fleet (1 for a single-env run)")
        self._batch_size = Histogram("rtloop_inference_batch_size", "Frames per policy call (a fleet's batch)",
                                     list(L), registry=r, buckets=BATCH_BUCKETS)
        self._env_actions = counter("rtloop_env_actions", "Actions applied, per env and source", ["env", "source"])
        self._env_action_age = histogram("rtloop_env_action_age_seconds", "Action age, per env", ["env"])

        self._ticks = counter("rtloop_ticks", "Sim ticks")
        self._overruns = counter("rtloop_tick_overruns", "Ticks that ran past their budget")
        self._actions = counter("rtloop_actions", "Actions applied, by source (fresh, held, dummy, stop)", ["source"])
        self._dropped = counter("rtloop_frames_dropped", "Frames overwritten unread in the mailbox")
        self._inferences = counter("rtloop_inferences", "Completed inferences")
        self._episodes = counter("rtloop_episodes", "Finished episodes")
        self._successes = counter("rtloop_episode_successes", "Episodes that ended in success")
        self._errors = counter("rtloop_errors", "Errors, by kind", ["kind"])
        self._alerts = counter("rtloop_alerts", "Silent-failure alerts raised by the policy, by kind", ["kind"])

        self._run: dict | None = None  # the run's labels and its bound children, set by the run record
        self._dropped_seen: dict[int, int] = {}  # env -> its last running total of dropped frames
        self._kinds_seen: dict[str, set[str]] = {"errors": set(), "alerts": set()}
        self._kinds_lock = threading.Lock()  # errors and alerts may come from either task's thread

    # --- Sink protocol -------------------------------------------------------------------------------

    def on_record(self, record: Record) -> None:
        if isinstance(record, TickRecord):
            self._on_tick(record)
        elif isinstance(record, InferenceRecord):
            self._on_inference(record)
        elif isinstance(record, EpisodeRecord):
            self._on_episode(record)
        elif isinstance(record, ErrorRecord):
            self._count_kind("errors", record.error_kind)
        elif isinstance(record, AlertRecord):  # a silent failure the policy or the runtime suspects
            self._count_kind("alerts", record.alert_kind)
        elif isinstance(record, RunRecord):
            self._on_run_start(record.info)

    def close(self) -> None:
        """Nothing to flush: the registry lives as long as the sink. The HTTP server is closed by its owner."""

    # --- helpers -------------------------------------------------------------------------------------

    def _on_run_start(self, info: dict) -> None:
        """info: rate (Hz), suite, task (id), engine, policy (its label), and optionally random_weights (bool)
        and sync (bool). Creates every series up front, at 0, so dashboards show 0 rather than no data."""
        labels = {
            "suite": str(info.get("suite", "unknown")),
            "task": str(info.get("task", "unknown")),
            "engine": str(info.get("engine", "unknown")),
        }
        mode = "sync" if info.get("sync") else "async"
        self._run_info.labels(**labels, policy=policy_kind(info), mode=mode).set(1)
        self._rate.labels(**labels).set(float(info.get("rate", 0.0)))
        self._gpu_allocated.labels(**labels).set_function(lambda: _gpu_bytes("memory_allocated"))
        self._gpu_reserved.labels(**labels).set_function(lambda: _gpu_bytes("memory_reserved"))
        self._run = {"labels": labels}
        self._run.update(
            {name: getattr(self, "_" + name).labels(**labels) for name in (
                "episode", "step", "inference", "interval", "overrun", "lateness", "queue_wait", "frame_age",
                "action_age", "ticks", "overruns", "dropped", "inferences", "episodes", "successes",
            )}
        )
        self._run["stage"] = {s: self._stage.labels(**labels, stage=s) for s in (*STAGES, *SUB_STAGES, *SIM_STAGES)}
        self._run["actions"] = {s: self._actions.labels(**labels, source=s) for s in ACTION_SOURCES}
        envs = int(info.get("envs", 1))
        self._envs.labels(**labels).set(envs)
        self._run["batch_size"] = self._batch_size.labels(**labels)
        self._run["env_actions"] = [{s: self._env_actions.labels(**labels, env=str(e), source=s)
                                     for s in ACTION_SOURCES} for e in range(envs)]
        self._run["env_action_age"] = [self._env_action_age.labels(**labels, env=str(e)) for e in range(envs)]
        for kind in _error_kinds():
            self._count_kind("errors", kind, 0)
        for kind in (*ALERT_KINDS, "other"):
            self._count_kind("alerts", kind, 0)

    def _on_tick(self, rec: TickRecord) -> None:
        run = self._bound()
        run["episode"].set(rec.episode)
        run["step"].set(rec.step)
        run["ticks"].inc()
        run["actions"][rec.action_source].inc()
        run["stage"]["step"].observe(rec.step_s)
        run["stage"]["physics"].observe(rec.physics_s)
        run["stage"]["render"].observe(rec.render_s)
        run["lateness"].observe(max(rec.lateness_s, 0.0))
        run["overrun"].observe(rec.overrun_s)
        if rec.overrun_s > 0:
            run["overruns"].inc()
        if rec.interval_s is not None:
            run["interval"].observe(rec.interval_s)
        run["env_actions"][rec.env][rec.action_source].inc()
        if rec.action_age_s is not None:
            run["action_age"].observe(rec.action_age_s)
            run["env_action_age"][rec.env].observe(rec.action_age_s)
        # The record carries a running total per env; a counter wants increments. A total that falls starts
        # again from 0 (a fleet env whose worker was replaced).
        seen = self._dropped_seen.get(rec.env, 0)
        fresh_drops = rec.frames_dropped_total - seen if rec.frames_dropped_total >= seen else rec.frames_dropped_total
        if fresh_drops > 0:
            run["dropped"].inc(fresh_drops)
        self._dropped_seen[rec.env] = rec.frames_dropped_total

    def _on_inference(self, rec: InferenceRecord) -> None:
        run = self._bound()
        run["inferences"].inc()
        run["inference"].observe(rec.t_end - rec.t_start)
        run["queue_wait"].observe(rec.queue_wait_s)
        run["frame_age"].observe(rec.frame_age_s)
        if rec.batch_index == 0:  # one observation per policy call
            run["batch_size"].observe(rec.batch_size)
        for stage, seconds in rec.stages.items():
            if stage in run["stage"]:
                run["stage"][stage].observe(seconds)

    def _on_episode(self, rec: EpisodeRecord) -> None:
        run = self._bound()
        run["episodes"].inc()
        if rec.success:
            run["successes"].inc()

    def _bound(self) -> dict:
        if self._run is None:
            raise RuntimeError("PrometheusSink: the run record must come before any other")
        return self._run

    def _count_kind(self, family: str, kind: str, amount: float = 1) -> None:
        counter = self._errors if family == "errors" else self._alerts
        kind = _KIND_RE.sub("_", kind.lower()).strip("_") or "other"
        with self._kinds_lock:
            seen = self._kinds_seen[family]
            if kind not in seen and len(seen) >= MAX_KINDS:
                kind = "other"
            seen.add(kind)
            counter.labels(**self._bound()["labels"], kind=kind).inc(amount)


@dataclass
class MetricsServer:
    """The /metrics endpoint of one registry. close() stops the server and joins its thread."""

    server: object
    thread: threading.Thread
    addr: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.addr}:{self.port}/metrics"

    def close(self) -> None:
        self.server.shutdown()  # returns once serve_forever has exited
        self.server.server_close()
        self.thread.join()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def start_metrics_server(port: int, registry: CollectorRegistry, addr: str = "127.0.0.1") -> MetricsServer:
    """Serve `registry` at http://addr:port/metrics from a background thread.

    Loopback by default: metrics are not published to the network unless asked for. The docker-compose
    setup in grafana/ runs Prometheus with host networking so it reaches 127.0.0.1:9464 unchanged; pass
    addr="0.0.0.0" to be scraped from another machine or a bridged container. port=0 lets the OS pick a free
    port (see MetricsServer.port); switching metrics off is the caller's business."""
    if not 0 <= port <= 65535:
        raise MetricsError(f"metrics port {port} is out of range (1-65535, or 0 to turn metrics off)")
    try:
        server, thread = start_http_server(port, addr=addr, registry=registry)
    except OSError as e:
        reason = e.strerror or str(e)
        hint = "pick another --metrics-port, or 0 to turn metrics off"
        raise MetricsError(f"cannot serve metrics on {addr}:{port}: {reason} ({hint})") from None
    thread.name = f"rtloop-metrics-{server.server_port}"
    return MetricsServer(server=server, thread=thread, addr=addr, port=server.server_port)
