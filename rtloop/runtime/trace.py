"""The JSONL trace: one JSON object per line. The first line is the run header (kind "run": config,
policy and sim labels, machine, versions); then "tick", "inference", "episode" and "error" records in the
order they happened. Flushed after every episode and on close, so an interrupted run keeps what it did."""

from __future__ import annotations

import json
from pathlib import Path

from rtloop import clock
from rtloop.runtime.records import EpisodeRecord, InferenceRecord, TickRecord, to_dict


def _jsonable(value):
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    return str(value)


class TraceSink:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("w", encoding="utf-8")

    def _write(self, obj: dict) -> None:
        self._file.write(json.dumps(obj, default=_jsonable) + "\n")

    def on_run_start(self, info: dict) -> None:
        self._write({"kind": "run", **info})
        self._file.flush()

    def on_tick(self, rec: TickRecord) -> None:
        self._write(to_dict(rec))

    def on_inference(self, rec: InferenceRecord) -> None:
        self._write(to_dict(rec))

    def on_episode(self, rec: EpisodeRecord) -> None:
        self._write(to_dict(rec))
        self._file.flush()

    def on_error(self, kind: str, message: str) -> None:
        self._write({"kind": "error", "error_kind": kind, "message": message, "t": clock.now()})
        self._file.flush()

    def on_alert(self, kind: str, message: str) -> None:
        self._write({"kind": "alert", "alert_kind": kind, "message": message, "t": clock.now()})

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def read_trace(path: Path) -> list[dict]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
