"""The one record stream the runtime emits. Every sink (trace file, summary log, live view, Prometheus)
reads it through `Sink.on_record`; nothing else flows from the loop to the outside. Times come from the
runtime's clock (rtloop.clock: wall by default, virtual with --clock virtual); `*_s` durations measured on
the machine (step, physics, render, inference stages) are always wall time.

Every record carries `env`, the index of the env it came from (0 in a single run; a fleet has several).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, Protocol, Union

# fresh: first use of a new action; held: reused; dummy: none yet; stop: the newest one is older than
# --max-action-age, so the arm is stopped (zero motion, gripper unchanged); chunk: the action an action
# chunk planned for this step
ACTION_SOURCES = ("fresh", "held", "dummy", "stop", "chunk")
ActionSource = Literal["fresh", "held", "dummy", "stop", "chunk"]


@dataclass
class RunRecord:
    """The run header: config, policy and sim labels, machine, versions, clock."""

    info: dict
    kind: str = "run"


@dataclass
class TickRecord:
    episode: int
    step: int  # policy step within the episode, 0-based, after the settle steps
    t_start: float  # when the tick began
    t_end: float  # when its step ended (its frame's capture time)
    deadline: float  # when the tick was scheduled to begin
    interval_s: float | None  # since the previous tick began (None for the first)
    overrun_s: float  # how far the tick ran past its budget (0 if it fit)
    lateness_s: float  # t_start - deadline: jitter of the tick start
    step_s: float  # env.step wall time
    physics_s: float
    render_s: float
    action_source: ActionSource
    action_seq: int | None  # which inference produced the applied action (stop: the stale one)
    action_age_s: float | None  # t_start - capture time of the frame the action was computed from
    frame_seq: int  # sequence number of the frame this tick published
    frames_dropped_total: int  # frames overwritten unread in the mailbox so far this run
    done: bool
    success: bool
    # source "chunk" only (None otherwise): the action's position in its chunk (= ticks since the chunk's
    # observation), the chunk's length, ticks since the chunk reached the sim, merged with an older chunk
    chunk_index: int | None = None
    chunk_len: int | None = None
    chunk_age_ticks: int | None = None
    chunk_merged: bool | None = None
    env: int = 0  # which env of a fleet (`rtloop run --envs N`): 0..N-1; 0 for a single env
    kind: str = "tick"


@dataclass
class InferenceRecord:
    episode: int
    seq: int  # inference number within the run
    frame_seq: int
    frame_time: float  # when the frame was captured
    t_start: float
    t_end: float  # when the action was ready (virtual clock: t_start + the latency model's sample)
    queue_wait_s: float  # time the inference task waited for a new frame
    frame_age_s: float  # t_start - frame_time
    stages: dict[str, float] = field(default_factory=dict)  # processor / generate / detokenize, wall seconds
    action: list[float] = field(default_factory=list)
    env: int = 0
    batch_size: int = 1  # frames in the batch this inference was part of (one policy call)
    batch_index: int = 0  # this frame's place in that batch: 0 for the first, so a batch is counted once
    kind: str = "inference"


@dataclass
class EpisodeRecord:
    episode: int
    suite: str
    task_id: int
    t_start: float
    t_end: float
    steps: int
    success: bool
    error: str | None = None  # one line, if the episode ended on an exception ("interrupted" on a signal)
    env: int = 0
    kind: str = "episode"


@dataclass
class ErrorRecord:
    error_kind: str  # a bounded label value (RtloopError.kind, or "error")
    message: str  # one line
    t: float
    episode: int | None = None
    env: int = 0
    kind: str = "error"


@dataclass
class AlertRecord:
    alert_kind: str  # one of rtloop.policy.base.ALERT_KINDS
    message: str
    t: float
    episode: int | None = None
    env: int = 0
    kind: str = "alert"


Record = Union[RunRecord, TickRecord, InferenceRecord, EpisodeRecord, ErrorRecord, AlertRecord]


def to_dict(record: Record) -> dict:
    """The record as its trace line: the run header flattened ({"kind": "run", **info}), the others as fields."""
    if isinstance(record, RunRecord):
        return {"kind": "run", **record.info}
    return asdict(record)


class Sink(Protocol):
    def on_record(self, record: Record) -> None: ...
    def close(self) -> None: ...


class Fanout:
    """Hands every record to each sink in turn."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks

    def on_record(self, record: Record) -> None:
        for s in self.sinks:
            s.on_record(record)

    def close(self) -> None:
        for s in self.sinks:
            s.close()
