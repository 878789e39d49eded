"""The live view: one screen redrawn in place at ~4 Hz on a terminal, a one-line status every few
seconds otherwise (logs, CI), so someone watching a long run sees it move. Goes to stderr: stdout keeps
only the summary."""

from __future__ import annotations

import shutil
import sys
from collections import deque
from typing import TextIO

import anyio
import numpy as np

from rtloop import clock
from rtloop.runtime.records import AlertRecord, EpisodeRecord, ErrorRecord, InferenceRecord, Record, TickRecord

WINDOW = 40  # recent ticks / inferences the rates and medians are taken over


def _hz(times: deque) -> float:
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0


def _ms(values) -> str:
    return f"{np.median(list(values)) * 1e3:.0f}" if values else "-"


class LiveView:
    def __init__(self, title: str, horizon: int, episodes: int) -> None:
        self.title = title
        self.horizon = horizon
        self.episodes = episodes
        self.episode: int | None = None
        self.episodes_done = 0
        self.successes = 0
        self.step = 0
        self.tick_times: deque[float] = deque(maxlen=WINDOW)
        self.inference_times: deque[float] = deque(maxlen=WINDOW)
        self.sources: deque[str] = deque(maxlen=WINDOW)
        self.step_s: deque[float] = deque(maxlen=WINDOW)
        self.render_s: deque[float] = deque(maxlen=WINDOW)
        self.lateness_s: deque[float] = deque(maxlen=WINDOW)
        self.stages: dict[str, deque[float]] = {}
        self.dropped = 0
        self.errors = 0
        self.last_error = ""

    def on_record(self, record: Record) -> None:
        if isinstance(record, TickRecord):
            self.episode, self.step = record.episode, record.step + 1
            self.tick_times.append(record.t_start)
            self.sources.append(record.action_source)
            self.step_s.append(record.step_s)
            self.render_s.append(record.render_s)
            self.lateness_s.append(record.lateness_s)
            self.dropped = record.frames_dropped_total
        elif isinstance(record, InferenceRecord):
            self.inference_times.append(record.t_end)
            for name, value in record.stages.items():
                self.stages.setdefault(name, deque(maxlen=WINDOW)).append(value)
        elif isinstance(record, EpisodeRecord):
            self.episodes_done += 1
            self.successes += record.success
            self.tick_times.clear()
            self.inference_times.clear()
        elif isinstance(record, ErrorRecord):
            self.errors += 1
            self.last_error = f"{record.error_kind}: {record.message}"
        elif isinstance(record, AlertRecord):
            self.last_error = f"alert {record.alert_kind}: {record.message}"

    def close(self) -> None:
        pass

    def status_line(self) -> str:
        fresh = 100 * self.sources.count("fresh") / len(self.sources) if self.sources else 0.0
        stages = " ".join(f"{k} {_ms(v)}" for k, v in self.stages.items())
        return (
            f"ep {self.episode if self.episode is not None else '-'} ({self.episodes_done}/{self.episodes} done, "
            f"{self.successes} ok) step {self.step}/{self.horizon} | sim {_hz(self.tick_times):.1f} Hz "
            f"inf {_hz(self.inference_times):.2f} Hz | fresh {fresh:.0f}% drops {self.dropped} | "
            f"p50 ms: step {_ms(self.step_s)} {stages}"
        )

    def screen(self) -> list[str]:
        fresh = 100 * self.sources.count("fresh") / len(self.sources) if self.sources else 0.0
        lines = [
            self.title,
            f"episode {self.episode if self.episode is not None else '-'}   step {self.step}/{self.horizon}   "
            f"episodes done {self.episodes_done}/{self.episodes}   successes {self.successes}",
            f"sim {_hz(self.tick_times):6.1f} Hz   inference {_hz(self.inference_times):6.2f} Hz   "
            f"fresh {fresh:3.0f}%   dropped frames {self.dropped}   errors {self.errors}",
            f"p50 ms   step {_ms(self.step_s)}   render {_ms(self.render_s)}   "
            f"tick lateness {_ms(self.lateness_s)}",
            "p50 ms   " + "   ".join(f"{k} {_ms(v)}" for k, v in self.stages.items()),
        ]
        if self.last_error:
            lines.append(f"last error: {self.last_error}")
        return lines


async def run_live_view(view: LiveView, stream: TextIO = sys.stderr, line_every_s: float = 2.0) -> None:
    """Runs until cancelled."""
    if not stream.isatty():
        next_line = clock.now() + line_every_s
        while True:
            await anyio.sleep(max(0.0, next_line - clock.now()))
            next_line += line_every_s
            print(view.status_line(), file=stream, flush=True)
    drawn = 0
    try:
        while True:
            width = shutil.get_terminal_size().columns
            lines = [line[:width] for line in view.screen()]  # a wrapped line would break the redraw
            # cursor up over the previous screen, then rewrite each line and clear its tail
            stream.write(f"\x1b[{drawn}F" if drawn else "")
            stream.write("".join(f"{line}\x1b[K\n" for line in lines) + "\x1b[J")
            stream.flush()
            drawn = len(lines)
            await anyio.sleep(0.25)
    finally:
        stream.flush()
