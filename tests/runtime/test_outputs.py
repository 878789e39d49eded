"""The trace under a failing disk, strict JSON, and run directories two runs never share."""

from __future__ import annotations

import errno
import io
import json
import os

import pytest

from rtloop.commands.paths import check_writable, new_run_dir
from rtloop.errors import InputError
from rtloop.runtime.records import EpisodeRecord, RunRecord, TickRecord
from rtloop.runtime.trace import TraceSink


def tick(step: int) -> TickRecord:
    return TickRecord(episode=0, step=step, t_start=step * 0.05, t_end=step * 0.05 + 0.01, deadline=step * 0.05,
                      interval_s=None, overrun_s=0.0, lateness_s=0.0, step_s=0.01, physics_s=0.0, render_s=0.0,
                      action_source="fresh", action_seq=step, action_age_s=0.02, frame_seq=step + 1,
                      frames_dropped_total=0, done=False, success=False)


class FillsUp(io.RawIOBase):
    """A file on a disk with `room` bytes left: writes what fits (a short write), then ENOSPC."""

    def __init__(self, room: int) -> None:
        self.data, self.room = bytearray(), room

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        if self.room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        part = bytes(b[: self.room])
        self.data += part
        self.room -= len(part)
        return len(part)

    def truncate(self, size=None) -> int:
        del self.data[size:]
        return size


@pytest.mark.parametrize("room", [0, 100, 1500, 3000])
def test_a_disk_that_fills_warns_once_and_the_trace_ends_on_a_whole_line(room, capsys):
    file = FillsUp(room)
    sink = TraceSink("trace.jsonl", file=file)
    sink.on_record(RunRecord({"rate": 20.0}))
    for episode in range(3):
        for step in range(5):
            sink.on_record(tick(step))
        sink.on_record(EpisodeRecord(episode, "s", 0, 0.0, 1.0, 5, False))
    sink.close()
    assert sink.failed and "No space left on device" in sink.failed
    text = file.data.decode()
    assert text == "" or text.endswith("\n")
    assert all(json.loads(line) for line in text.splitlines())
    assert capsys.readouterr().err.count("rtloop: warning: trace") == 1


def test_dev_full(capsys):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    sink = TraceSink("/dev/full")
    sink.on_record(RunRecord({"rate": 20.0}))
    sink.on_record(tick(0))
    sink.close()
    assert sink.failed and capsys.readouterr().err.count("rtloop: warning") == 1


def test_non_finite_numbers_are_written_as_null(tmp_path):
    sink = TraceSink(tmp_path / "trace.jsonl")
    sink.on_record(RunRecord({"rate": float("inf"), "x": [1.0, float("nan")]}))
    sink.close()
    line = (tmp_path / "trace.jsonl").read_text()
    assert json.loads(line) == {"kind": "run", "rate": None, "x": [1.0, None]}
    assert "Infinity" not in line and "NaN" not in line


def test_two_runs_in_the_same_second_get_their_own_directory(tmp_path):
    first, second = new_run_dir(tmp_path), new_run_dir(tmp_path)
    assert first != second and first.is_dir() and second.is_dir()
    assert second.name.startswith(first.name)


def test_unwritable_output_paths_are_found_before_anything_starts(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(InputError, match="is not a directory"):
        check_writable(blocker / "trace.jsonl", "--trace")
    check_writable(tmp_path / "new" / "deeper" / "trace.jsonl", "--trace")
    assert not (tmp_path / "new").exists()  # the check creates nothing
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]
