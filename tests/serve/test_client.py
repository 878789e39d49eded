"""RemotePolicy against the real server code in-process, around test backends: openpi-form requests to a
server that is not rtloop's, action chunks executed in order through ChunkBuffer, reconnect with backoff."""

from __future__ import annotations

import numpy as np
import pytest
from serving import InProcessServer

from rtloop.errors import PolicyError
from rtloop.runtime.chunks import ChunkBuffer
from rtloop.serve.client import RemotePolicy, openpi_libero_request, resize_with_pad
from rtloop.serve.server import Result
from rtloop.sim.base import Observation

FRAME = np.random.default_rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8)


class FixedChunks:
    """A π0-like server: every request gets a [5, 7] chunk whose values say which call and position."""

    max_batch = 1
    metadata = {"policy": "fixed chunks (test)", "action_horizon": 5}

    def __init__(self):
        self.requests = []

    def act_batch(self, requests, streams):
        results = []
        for request in requests:
            self.requests.append(request)
            chunk = 10 * len(self.requests) + np.arange(5, dtype=np.float64)[:, None] * np.ones((1, 7))
            results.append(Result(chunk, chunk, {"generate": 0.001}))
        return results

    def end_stream(self, stream):
        pass


@pytest.fixture
def fixed():
    backend = FixedChunks()
    server = InProcessServer(backend).start()
    yield backend, server
    server.close()


def test_an_openpi_server_gets_openpi_libero_keys_and_chunks_execute_in_order(fixed):
    backend, server = fixed
    policy = RemotePolicy(server.url)
    assert not policy.is_rtloop and "fixed chunks (test)" in policy.label
    obs = Observation(FRAME, state={"robot0_eef_pos": np.zeros(3), "robot0_eef_quat": np.array([0, 0, 0, 1.0]),
                                    "robot0_gripper_qpos": np.zeros(2)})
    buf, executed = ChunkBuffer("latest_only"), []
    for step in range(12):
        if buf.needs_request(0.4):  # 2 of 5 left: ask (the request answers at once here)
            out = policy.act(obs, "pick up the soup")
            assert out.chunk.shape == (5, 7) and np.array_equal(out.action, out.chunk[0])
            buf.add(out.chunk, seq=len(backend.requests), start=step)
        executed.append(buf.pop(step).action[0])
    policy.close()
    # chunk 1 (10..14) runs 3 steps, then chunk 2 (20..) replaces what was left of it, and so on
    assert executed == [10, 11, 12, 20, 21, 22, 30, 31, 32, 40, 41, 42]
    req = backend.requests[0]
    assert req.form == "openpi" and req.instruction == "pick up the soup"
    np.testing.assert_array_equal(req.image, resize_with_pad(FRAME[::-1, ::-1]))  # rotated, 224x224


def test_openpi_request_fills_what_the_env_lacks_with_zeros_and_says_so(fixed):
    _, server = fixed
    msg, missing = openpi_libero_request(Observation(FRAME), "x")
    assert missing == ["observation/wrist_image", "observation/state"]
    assert msg["observation/state"].shape == (8,) and msg["observation/image"].shape == (224, 224, 3)
    policy = RemotePolicy(server.url)
    first, second = policy.act(Observation(FRAME), "x"), policy.act(Observation(FRAME), "x")
    assert [a.kind for a in first.alerts] == ["remote_input"] and second.alerts == []  # once
    policy.close()


def test_a_dropped_connection_is_redialled(fixed):
    backend, server = fixed
    policy = RemotePolicy(server.url, reconnect_s=30)
    policy.act(Observation(FRAME), "x")
    server.stop()  # every connection dropped
    server.start()  # same port
    assert policy.act(Observation(FRAME), "x").chunk.shape == (5, 7)
    assert policy.reconnects == 1
    policy.close()


def test_no_server_for_longer_than_the_reconnect_window_is_a_policy_error(fixed):
    _, server = fixed
    policy = RemotePolicy(server.url, reconnect_s=0.3)
    server.stop()
    with pytest.raises(PolicyError, match="could not reconnect within 0.3 s"):
        policy.act(Observation(FRAME), "x")
    server.start()
    policy.close()


def test_nobody_listening_is_one_line():
    with pytest.raises(PolicyError, match="cannot connect to ws://127.0.0.1:9"):
        RemotePolicy("ws://127.0.0.1:9", connect_timeout_s=2)
    with pytest.raises(Exception, match="ws:// or wss://"):
        RemotePolicy("http://127.0.0.1:9")
