"""`rtloop serve` as a real subprocess on loopback: rtloop's client gets actions, every kind of bad input
gets an error that names it and the server keeps serving, a fuzz loop cannot take it down, and binding
beyond loopback needs a key."""

from __future__ import annotations

import random
import re
import socket
import subprocess
import sys
import urllib.request

import msgpack
import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from rtloop.errors import PolicyError
from rtloop.serve.client import RemotePolicy
from rtloop.serve.protocol import pack, unpack
from rtloop.sim.base import Observation

from serving import MAX_MESSAGE_BYTES, start_serve, stop_serve

FRAME = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
GOOD = pack({"image": FRAME, "instruction": "pick up the alphabet soup"})


def send_one(url: str, message, timeout: float = 60):
    """A fresh connection: metadata, one message, the reply (bytes or an error str), and the close code
    that follows an error (None when the connection stays open)."""
    with connect(url, compression=None, max_size=None, open_timeout=30) as ws:
        assert isinstance(unpack(ws.recv(timeout=30)), dict)
        ws.send(message)
        try:
            reply = ws.recv(timeout=timeout)
        except ConnectionClosed as e:
            return None, e.rcvd.code if e.rcvd else None
        if isinstance(reply, bytes):
            return reply, None
        try:
            ws.recv(timeout=30)
        except ConnectionClosed as e:
            return reply, e.rcvd.code if e.rcvd else None
        raise AssertionError(f"the connection stayed open after the error {reply!r}")


def errors_by_kind(server) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    return {m[0]: float(m[1]) for m in re.findall(r'rtloop_server_errors_total\{[^}]*kind="(\w+)"[^}]*\} (\S+)', text)}


def assert_good_request_succeeds(server):
    reply, _ = send_one(server.url, GOOD)
    assert isinstance(reply, bytes), reply
    body = unpack(reply)
    assert np.asarray(body["actions"]).shape == (1, 7) and body["server_timing"]["batch_size"] == 1


def test_remote_policy_gets_actions_for_libero_frames(server, libero_frames, tiny_checkpoint):
    frames, instruction = libero_frames
    policy = RemotePolicy(server.url)
    try:
        assert policy.is_rtloop and "RANDOM WEIGHTS" in policy.label
        assert policy.metadata["action_shape"] == [1, 7] and policy.metadata["unnorm_key"] == "libero_object"
        assert policy.metadata["max_batch"] == 8  # --max-batch's default
        for frame in frames[:3]:
            out = policy.act(Observation(frame), instruction)
            assert out.action.shape == (7,) and out.chunk is None and out.action[-1] in (-1.0, 1.0)
            assert set(out.timings) == {"round_trip", "server_infer", "server_queue", "network"}
            assert 0 < out.timings["server_infer"] < out.timings["round_trip"]
    finally:
        policy.close()
    # the server ran OpenVLA's LIBERO path on the raw frame: the same action as in-process
    from rtloop.policy.openvla import OpenVLAPolicy

    local = OpenVLAPolicy(tiny_checkpoint, engine="eager").act(frames[2], instruction)
    np.testing.assert_allclose(out.action, local.action)
    np.testing.assert_allclose(out.raw_action, local.raw_action)


def test_the_alert_a_request_s_unnorm_key_raises_comes_back_to_that_client(server):
    reply, _ = send_one(server.url, pack({"image": FRAME, "instruction": "pick up the alphabet soup",
                                          "unnorm_key": "libero_spatial"}))  # the server runs libero_object
    alerts = unpack(reply).get("alerts", [])
    assert [a["kind"] for a in alerts] == ["unnorm_key"] and "another LIBERO suite" in alerts[0]["message"]


IMAGE = FRAME[:224, :224]
OBJECT_ARRAY = {b"__ndarray__": True, b"data": b"\x80\x04N.", b"dtype": "|O", b"shape": [1]}
BAD_INPUTS = {
    "malformed": (GOOD[: len(GOOD) // 2], "not a msgpack message"),
    "text frame": ("hello", "got a text frame"),
    "missing key": (pack({"image": IMAGE}), "missing key(s) instruction"),
    "unknown key": (pack({"image": IMAGE, "instruction": "x", "speed": 2}), "unknown key(s) speed"),
    "image shape": (pack({"image": IMAGE[:, :, :1].copy(), "instruction": "x"}), "got shape (224, 224, 1)"),
    "image dtype": (pack({"image": IMAGE.astype(np.int8), "instruction": "x"}), "must be uint8, got int8"),
    "object array": (msgpack.packb({"image": OBJECT_ARRAY, "instruction": "x"}), "object arrays are refused"),
    "oversize": (pack({"image": np.zeros((400, 400, 3), np.uint8), "instruction": "x"}),
                 f"over the limit of {MAX_MESSAGE_BYTES} bytes"),
    "unknown unnorm key": (pack({"image": IMAGE, "instruction": "x", "unnorm_key": "nope"}), "unknown unnorm_key"),
}
KIND = {"malformed": "malformed", "text frame": "malformed", "missing key": "missing_key",
        "unknown key": "unknown_key", "image shape": "bad_shape", "image dtype": "bad_dtype",
        "object array": "object_array", "oversize": "oversize", "unknown unnorm key": "bad_value"}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gets_an_error_naming_it_and_the_server_keeps_serving(server, case):
    message, words = BAD_INPUTS[case]
    before = errors_by_kind(server)
    reply, close_code = send_one(server.url, message)
    assert isinstance(reply, str) and words in reply and "\n" not in reply, reply
    assert reply.startswith(f"rtloop serve: {KIND[case]}: ")
    assert close_code == 1008
    assert errors_by_kind(server)[KIND[case]] == before[KIND[case]] + 1
    assert_good_request_succeeds(server)


def test_a_frame_far_over_the_limit_is_dropped_unread(server):
    reply, close_code = send_one(server.url, b"\0" * (3 * MAX_MESSAGE_BYTES))
    assert reply is None and close_code == 1009  # websockets' "message too big", before reading it
    assert_good_request_succeeds(server)


@pytest.mark.parametrize("how", ["close", "drop"])
def test_a_client_leaving_mid_request_does_not_hurt_the_server(server, how):
    ws = connect(server.url, compression=None, max_size=None, open_timeout=30).__enter__()
    ws.recv(timeout=30)
    ws.send(GOOD)
    if how == "close":
        ws.close()
    else:  # no closing handshake: the TCP connection just goes away
        ws.socket.close()
    assert_good_request_succeeds(server)
    assert server.process.poll() is None


def fuzz_messages(n: int, rng: random.Random):
    keys = ["image", "instruction", "unnorm_key", "observation/image", "prompt", "observation/state", "x", 1]
    values = [None, True, 3, -1.5, "soup", b"\0" * 7, [1, 2], {"a": 1}, IMAGE[:2, :2].copy(), np.zeros(3),
              msgpack.ExtType(3, b"x")]
    for i in range(n):
        r = i % 4
        if r == 0:  # random bytes
            yield bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 300)))
        elif r == 1:  # a good message cut short
            yield GOOD[: rng.randrange(0, len(GOOD))]
        elif r == 2:  # a good message with a flipped bit before its pixels (flipped pixels stay valid)
            data = bytearray(GOOD)
            data[rng.randrange(0, GOOD.index(FRAME[:1, :2].tobytes()))] ^= 1 << rng.randrange(8)
            yield bytes(data)
        else:  # a well-formed map of random keys and values
            yield msgpack.packb({k: rng.choice(values) for k in rng.sample(keys, rng.randrange(0, 4))},
                                default=lambda o: {b"__ndarray__": True, b"data": o.tobytes(),
                                                   b"dtype": o.dtype.str, b"shape": o.shape})


def test_fuzz_loop_of_random_and_truncated_messages(server):
    rng = random.Random(17)
    replies = {"error": 0, "actions": 0, "dropped": 0}
    for message in fuzz_messages(1000, rng):  # each recv is bounded: a stuck server fails, it cannot hang
        reply, _ = send_one(server.url, message, timeout=60)
        if isinstance(reply, bytes):  # a flip that left the request valid (e.g. in the instruction's text)
            assert np.asarray(unpack(reply)["actions"]).shape == (1, 7)
        replies["error" if isinstance(reply, str) else "actions" if reply else "dropped"] += 1
    assert replies["dropped"] == 0 and replies["error"] >= 750, replies  # each message answered
    assert server.process.poll() is None
    assert_good_request_succeeds(server)


def test_health_endpoint(server):
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=10) as resp:
        assert resp.status == 200 and resp.read() == b"ok\n"


def test_insecure_warns_on_start(server):
    assert "WARNING: --insecure" in server.stderr()


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.7"])
def test_non_loopback_bind_without_a_key_is_refused(host):
    run = subprocess.run([sys.executable, "-m", "rtloop", "serve", "--host", host], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and run.stderr.startswith(f"rtloop: error: --host {host} is not a loopback")


def serve_fails(*args: str) -> str:
    run = subprocess.run([sys.executable, "-m", "rtloop", "serve", *args], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("\n") == 1 and "loading" not in run.stderr, run.stderr  # before the model loads
    return run.stderr


def test_a_port_in_use_fails_in_one_line_before_the_model_loads(tiny_checkpoint):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        stderr = serve_fails("--checkpoint", str(tiny_checkpoint), "--port", str(port), "--metrics-port", "0")
        assert stderr.startswith(f"rtloop: error: cannot serve on 127.0.0.1:{port}: Address already in use")
        stderr = serve_fails("--checkpoint", str(tiny_checkpoint), "--port", "0", "--metrics-port", str(port))
        assert stderr.startswith(f"rtloop: error: cannot serve metrics on 127.0.0.1:{port}: Address already in use")


def test_an_address_that_is_not_this_machines_fails_in_one_line_before_the_model_loads(tiny_checkpoint):
    stderr = serve_fails("--checkpoint", str(tiny_checkpoint), "--host", "192.0.2.7", "--insecure")  # TEST-NET-1
    assert stderr.startswith("rtloop: error: cannot serve on 192.0.2.7:8000: Cannot assign requested address")


def test_the_api_key_is_checked_on_connect(tiny_checkpoint, tmp_path):
    served = start_serve(tmp_path, "--checkpoint", str(tiny_checkpoint), "--api-key", "s3cret")
    try:
        for key in (None, "wrong"):
            with pytest.raises(PolicyError, match="HTTP 401"):
                RemotePolicy(served.url, api_key=key)
        policy = RemotePolicy(served.url, api_key="s3cret")
        assert policy.act(Observation(FRAME), "pick up the soup").action.shape == (7,)
        policy.close()
        assert "auth: refused" in served.stderr()
    finally:
        assert stop_serve(served) == 0
