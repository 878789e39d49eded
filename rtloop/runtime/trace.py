"""The JSONL trace: one JSON object per line. The first line is the run header (kind "run": config,
policy and sim labels, clock, machine, versions); then "tick", "inference", "episode", "error" and "alert"
records in the order they happened (fields in rtloop.runtime.records).

Written in whole lines: records are buffered and written at each episode's end, on close, and whenever
the buffer grows past BUFFER_BYTES. A write that fails (a full disk, a file that went away) is warned
about once and the file is cut back to its last whole line, so the trace never ends mid-line; the run
goes on without it and the command exits non-zero (`failed`). Strict JSON: NaN and infinity are written
as null.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import BinaryIO

from rtloop.runtime.records import EpisodeRecord, ErrorRecord, Record, RunRecord, to_dict

BUFFER_BYTES = 1 << 16


def _jsonable(value):
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    return str(value)


def _finite(value):
    """NaN and infinity as null (strict JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def dumps(obj) -> str:
    """Strict JSON (allow_nan=False); a non-finite number becomes null rather than invalid JSON."""
    try:
        return json.dumps(obj, default=_jsonable, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(json.loads(json.dumps(obj, default=_jsonable))), allow_nan=False)


class TraceSink:
    def __init__(self, path: Path, file: BinaryIO | None = None) -> None:
        """file: an open binary file to write instead of opening `path` (tests give a failing one)."""
        self.path = Path(path)
        if file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            file = self.path.open("wb", buffering=0)
        self._file = file
        self._lines: list[bytes] = []
        self._buffered = 0
        self._written = 0  # bytes of whole lines in the file
        self.failed: str | None = None  # why the trace stopped being written, if it did

    def on_record(self, record: Record) -> None:
        if self.failed:
            return
        line = (dumps(to_dict(record)) + "\n").encode()
        self._lines.append(line)
        self._buffered += len(line)
        if isinstance(record, (RunRecord, EpisodeRecord, ErrorRecord)) or self._buffered >= BUFFER_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.failed or not self._lines:
            return
        data, self._lines, self._buffered = b"".join(self._lines), [], 0
        done = 0
        try:
            while done < len(data):
                n = self._file.write(data[done:])
                if not n:
                    raise OSError("the trace file accepted no bytes")
                done += n
            flush = getattr(self._file, "flush", None)
            if flush is not None:
                flush()
        except OSError as e:
            self._fail(e, self._written + data.rfind(b"\n", 0, done) + 1)
        self._written += done

    def _fail(self, error: OSError, whole: int) -> None:
        """Warn once; cut the file back to `whole` bytes (the end of its last whole line)."""
        self.failed = f"trace {self.path} stopped being written: {error.strerror or error}"
        print(f"rtloop: warning: {self.failed}; the run goes on without it", file=sys.stderr)
        try:  # a device such as /dev/full cannot be cut, but nothing reached it either
            self._file.truncate(whole)
        except (OSError, ValueError, AttributeError):
            pass

    def close(self) -> None:
        self.flush()
        if not self._file.closed:
            try:
                self._file.close()
            except OSError as e:
                if not self.failed:
                    self._fail(e, self._written)


def read_trace(path: Path) -> list[dict]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
