"""The serve tests share one real `rtloop serve` subprocess (tiny random checkpoint, loopback)."""

from __future__ import annotations

import numpy as np
import pytest
from serving import DATA, MAX_MESSAGE_BYTES, start_serve, stop_serve

from rtloop.sim.replay import decode_frames


@pytest.fixture(scope="session")
def server(tiny_checkpoint, tmp_path_factory):
    served = start_serve(tmp_path_factory.mktemp("serve"), "--checkpoint", str(tiny_checkpoint), "--insecure",
                         "--max-message-bytes", str(MAX_MESSAGE_BYTES))
    yield served
    assert stop_serve(served) == 0, served.stderr()  # SIGTERM: a clean stop


@pytest.fixture(scope="session")
def libero_frames():
    data = np.load(DATA)
    frames = decode_frames(data["frames_delta"], data["frame_task_ids"])
    instruction = str(data["instructions"][list(data["task_ids"]).index(data["frame_task_ids"][0])])
    return frames[data["frame_task_ids"] == data["frame_task_ids"][0]], instruction
