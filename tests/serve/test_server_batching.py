"""Requests from several clients batched into one model call: real websocket clients against the server code
in-process. The backend's first call waits at a gate until the other clients' requests are queued behind it
(the server's own `rtloop_server_requests_waiting` says when), so what goes into the next call is known."""

from __future__ import annotations

import threading
import time
from contextlib import ExitStack

import numpy as np
import pytest
from serving import InProcessServer
from websockets.sync.client import connect

from rtloop.errors import InputError
from rtloop.policy.openvla import OpenVLAPolicy
from rtloop.serve.backend import OpenVLABackend
from rtloop.serve.client import openpi_libero_request
from rtloop.serve.protocol import pack, unpack
from rtloop.serve.server import Result
from rtloop.sim.base import Observation

WAIT_S = 60  # bounds every wait: a broken server fails the test instead of hanging it


class Gated:
    """A backend whose calls wait until the test opens the gate; it records each call's requests and streams."""

    def __init__(self, inner):
        self.inner, self.metadata, self.max_batch = inner, inner.metadata, inner.max_batch
        self.entered, self.gate = threading.Event(), threading.Event()
        self.calls: list[tuple[list, list[int]]] = []

    def act_batch(self, requests, streams):
        self.entered.set()
        assert self.gate.wait(WAIT_S)
        self.calls.append((list(requests), list(streams)))
        return self.inner.act_batch(requests, streams)

    def end_stream(self, stream):
        self.inner.end_stream(stream)


def sample(server: InProcessServer, name: str, **labels) -> float:
    return server.metrics.registry.get_sample_value(name, {"engine": "test", **labels}) or 0.0


def ask(ws, message: bytes):
    ws.send(message)
    reply = ws.recv(timeout=WAIT_S)
    return unpack(reply) if isinstance(reply, bytes) else reply


def pile_up(server: InProcessServer, backend: Gated, clients: list, messages: list[bytes]) -> list:
    """clients[0]'s request goes into a call that waits at the gate; the others queue behind it; then the
    gate opens. Each client's reply (a dict, or an error's text)."""
    clients[0].send(messages[0])
    assert backend.entered.wait(WAIT_S)
    for ws, message in zip(clients[1:], messages[1:]):
        ws.send(message)
    deadline = time.monotonic() + WAIT_S
    while sample(server, "rtloop_server_requests_waiting") < len(messages) - 1:
        assert time.monotonic() < deadline, "the requests never reached the server's queue"
        time.sleep(0.01)
    backend.gate.set()
    replies = []
    for ws in clients:
        reply = ws.recv(timeout=WAIT_S)
        replies.append(unpack(reply) if isinstance(reply, bytes) else reply)
    return replies


def open_clients(stack: ExitStack, url: str, n: int) -> list:
    clients = []
    for _ in range(n):
        ws = stack.enter_context(connect(url, compression=None, max_size=None, open_timeout=WAIT_S))
        assert isinstance(unpack(ws.recv(timeout=WAIT_S)), dict)
        clients.append(ws)
    return clients


def test_clients_waiting_together_get_one_call_and_each_its_own_batch1_action(tiny_checkpoint, libero_frames):
    frames, instruction = libero_frames
    instructions = [instruction, "open the top drawer and put the bowl inside", "pick it up", instruction,
                    "put both the alphabet soup and the tomato sauce in the basket", "pick up the ketchup"]
    messages = [pack({"image": frames[3 * i], "instruction": text}) for i, text in enumerate(instructions[:-1])]
    messages.append(pack(openpi_libero_request(Observation(frames[14]), instructions[-1])[0]))  # openpi's form
    backend = Gated(OpenVLABackend(OpenVLAPolicy(tiny_checkpoint, max_batch=4)))
    server = InProcessServer(backend).start()
    try:
        with ExitStack() as stack:
            clients = open_clients(stack, server.url, len(messages))
            batched = pile_up(server, backend, clients, messages)
            # 1 at the gate; then 5 waiting, 4 at most per call: 4, then 1
            assert [len(requests) for requests, _ in backend.calls] == [1, 4, 1]
            assert sorted(r["server_timing"]["batch_size"] for r in batched) == [1, 1, 4, 4, 4, 4]
            assert all(r["server_timing"]["queue_ms"] > 0 for r in batched[1:])  # they waited for the first call
            streams = [s for _, call in backend.calls for s in call]
            assert len(set(streams)) == 6 and 0 not in streams  # one stream per connection
            assert {r.form for requests, _ in backend.calls for r in requests} == {"rtloop", "openpi"}
            assert len({tuple(r["raw_actions"][0]) for r in batched}) > 1  # each frame its own action
            for ws, message, reply in zip(clients, messages, batched):  # the same frame again, alone
                alone = ask(ws, message)
                assert alone["server_timing"]["batch_size"] == 1
                np.testing.assert_array_equal(reply["actions"], alone["actions"])  # fp32 on the CPU: exact
                np.testing.assert_array_equal(reply["raw_actions"], alone["raw_actions"])
        sizes = [len(requests) for requests, _ in backend.calls]
        assert sample(server, "rtloop_server_batch_size_count") == len(sizes) == 9
        assert sample(server, "rtloop_server_batch_size_sum") == sum(sizes) == 12
        assert sample(server, "rtloop_server_batch_size_bucket", le="2.0") == 8
        assert sample(server, "rtloop_server_batch_size_bucket", le="4.0") == 9
        assert sample(server, "rtloop_server_requests_waiting") == 0
    finally:
        server.close()  # joins the inference thread: every connection's end_stream has run
    assert set(backend.inner.policy._stream_guards) == {0}  # the clients' frame histories are gone with them


class Echo:
    """Answers each request with its instruction's length; a call holding "refuse me" raises, as a policy
    refuses input it cannot take."""

    max_batch = 8
    metadata = {"policy": "echo (test)"}

    def act_batch(self, requests, streams):
        if any(r.instruction == "refuse me" for r in requests):
            raise InputError("this policy refuses 'refuse me'")
        return [Result(np.full((1, 7), len(r.instruction), float), np.zeros((1, 7))) for r in requests]

    def end_stream(self, stream):
        pass


@pytest.fixture
def echo():
    backend = Gated(Echo())
    server = InProcessServer(backend).start()
    yield backend, server
    server.close()


def image_request(instruction: str, **extra) -> bytes:
    return pack({"image": np.full((8, 8, 3), 7, np.uint8), "instruction": instruction, **extra})


def test_one_call_holds_requests_of_one_unnorm_key(echo):
    backend, server = echo
    keys = [None, None, "libero_object", None, "libero_spatial"]
    messages = [image_request(f"task {i}", **({} if k is None else {"unnorm_key": k})) for i, k in enumerate(keys)]
    with ExitStack() as stack:
        replies = pile_up(server, backend, open_clients(stack, server.url, len(messages)), messages)
    assert all(isinstance(r, dict) for r in replies), replies
    calls = [[r.unnorm_key for r in requests] for requests, _ in backend.calls]
    assert calls == [[None], [None, None], ["libero_object"], ["libero_spatial"]]  # oldest key first


def test_a_call_that_raises_is_rerun_one_request_at_a_time(echo):
    backend, server = echo
    messages = [image_request(text) for text in ("first", "good one", "refuse me", "good two")]
    with ExitStack() as stack:
        clients = open_clients(stack, server.url, len(messages))
        replies = pile_up(server, backend, clients, messages)
        assert replies[2] == "rtloop serve: bad_value: this policy refuses 'refuse me'"
        for i in (1, 3):  # the others are answered, alone
            assert replies[i]["actions"][0][0] == len(("first", "good one", "refuse me", "good two")[i])
            assert replies[i]["server_timing"]["batch_size"] == 1
        assert isinstance(ask(clients[1], messages[1]), dict)  # and keep their connections
    assert [len(requests) for requests, _ in backend.calls] == [1, 3, 1, 1, 1, 1]
    assert sample(server, "rtloop_server_batch_size_count") == 4  # the calls that answered
    assert sample(server, "rtloop_server_errors_total", kind="bad_value") == 1
