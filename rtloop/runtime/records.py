"""The records the runtime emits. Sinks (trace file, Prometheus exporter, live view, summary) consume
them; nothing else flows from the loop to the outside. All times come from rtloop.clock.now()."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, Protocol

# fresh: first use of a new action; held: reused; dummy: none yet
ACTION_SOURCES = ("fresh", "held", "dummy")
ActionSource = Literal["fresh", "held", "dummy"]


@dataclass
class TickRecord:
    episode: int
    step: int  # policy step within the episode, 0-based, after the settle steps
    t_start: float  # when the tick began (clock.now())
    t_end: float
    deadline: float  # when the tick was scheduled to begin
    interval_s: float | None  # since the previous tick began (None for the first)
    overrun_s: float  # how far the tick ran past its budget (0 if it fit)
    lateness_s: float  # t_start - deadline: jitter of the tick start
    step_s: float  # env.step wall time
    physics_s: float
    render_s: float
    action_source: ActionSource  # fresh: first use of a new action; held: reused; dummy: none yet
    action_seq: int | None  # which inference produced the applied action
    action_age_s: float | None  # t_start - capture time of the frame the action was computed from
    frame_seq: int  # sequence number of the frame this tick published
    frames_dropped_total: int  # frames overwritten unread in the mailbox so far this run
    done: bool
    success: bool
    kind: str = "tick"


@dataclass
class InferenceRecord:
    episode: int
    seq: int  # inference number within the run
    frame_seq: int
    frame_time: float  # when the frame was captured
    t_start: float
    t_end: float
    queue_wait_s: float  # time the inference task waited for a new frame
    frame_age_s: float  # t_start - frame_time
    stages: dict[str, float] = field(default_factory=dict)  # processor / generate / detokenize, seconds
    action: list[float] = field(default_factory=list)
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
    error: str | None = None  # one line, if the episode ended on an exception
    kind: str = "episode"


def to_dict(record) -> dict:
    return asdict(record)


class Sink(Protocol):
    def on_run_start(self, info: dict) -> None: ...
    def on_tick(self, rec: TickRecord) -> None: ...
    def on_inference(self, rec: InferenceRecord) -> None: ...
    def on_episode(self, rec: EpisodeRecord) -> None: ...
    def on_error(self, kind: str, message: str) -> None: ...
    def on_alert(self, kind: str, message: str) -> None: ...  # a possible silent failure the policy noticed
    def close(self) -> None: ...
