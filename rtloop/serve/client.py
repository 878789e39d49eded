"""`--policy ws://HOST:PORT`: a Policy whose model runs behind a websocket, in openpi's protocol.

    policy = make_remote_policy("ws://gpu-host:8000", api_key="...")
    out = policy.act(obs, env.instruction)      # out.chunk: [H, 7] when the server returns several actions

What it sends depends on who answers. `rtloop serve` announces itself in its metadata (`server: rtloop`) and
gets rtloop's form: the raw simulator frame and the instruction, so the server runs OpenVLA's exact LIBERO
image path. Any other server gets what openpi's LIBERO example sends (examples/libero/main.py):
`observation/image` and `observation/wrist_image` rotated 180° and resized (with padding) to 224x224 uint8,
`observation/state` = eef position (3) + axis-angle (3) + gripper joint positions (2), and `prompt`. The
wrist image and state come from `obs.state` (robosuite's key names); what the env does not provide is sent
as zeros, and the first such call carries an alert saying so.

Timings per call (seconds): round_trip (pack, send, wait, unpack), server_infer and server_queue (what
the server reports in `server_timing`), network = round_trip - server_infer - server_queue (the wire, both
codecs and the server's own decode).

A dropped connection is redialled with exponential backoff (50 ms doubling to 1 s) and the request sent
again; after `reconnect_s` without a server, act raises PolicyError and the runtime's stale-action guard
decides (hold the last action or stop). The next act starts redialling afresh.
"""

from __future__ import annotations

import math
import threading
import time
from contextlib import ExitStack

import numpy as np
from PIL import Image
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI
from websockets.sync.client import ClientConnection, connect

from rtloop import clock
from rtloop.errors import InputError, PolicyError
from rtloop.policy.base import Alert, PolicyOutput
from rtloop.serve.protocol import ProtocolError, pack, unpack
from rtloop.sim.base import Observation

OPENPI_IMAGE_SIZE = 224
BACKOFF_START_S, BACKOFF_MAX_S = 0.05, 1.0
CLOSE_GRACE_S = 2.0  # close() lets a request in flight have its reply this long: the server sees a clean close


def quat_to_axis_angle(quat: np.ndarray) -> np.ndarray:
    """robosuite's (x, y, z, w) quaternion -> axis * angle, as openpi's LIBERO example computes it."""
    w = float(np.clip(quat[3], -1.0, 1.0))
    den = math.sqrt(1.0 - w * w)
    if math.isclose(den, 0.0):
        return np.zeros(3)
    return np.asarray(quat[:3], dtype=np.float64) * 2.0 * math.acos(w) / den


def resize_with_pad(image: np.ndarray, size: int = OPENPI_IMAGE_SIZE) -> np.ndarray:
    """openpi_client.image_tools.resize_with_pad for one HxWx3 uint8 image: keep the aspect ratio (bilinear),
    pad with black to size x size."""
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    ratio = max(w / size, h / size)
    rw, rh = int(w / ratio), int(h / ratio)
    resized = Image.fromarray(image).resize((rw, rh), resample=Image.BILINEAR)
    out = Image.new(resized.mode, (size, size), 0)
    out.paste(resized, (max(0, (size - rw) // 2), max(0, (size - rh) // 2)))
    return np.asarray(out)


def openpi_libero_request(obs: Observation, instruction: str) -> tuple[dict, list[str]]:
    """What openpi's LIBERO example sends for one observation, and the inputs it had to fill with zeros."""
    state, missing = obs.state, []

    def camera(image):
        return resize_with_pad(np.ascontiguousarray(image[::-1, ::-1]))  # MuJoCo renders upside down

    wrist = state.get("robot0_eye_in_hand_image")
    if wrist is None:
        missing.append("observation/wrist_image")
        wrist_image = np.zeros((OPENPI_IMAGE_SIZE, OPENPI_IMAGE_SIZE, 3), np.uint8)
    else:
        wrist_image = camera(wrist)
    if all(k in state for k in ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")):
        proprio = np.concatenate((state["robot0_eef_pos"], quat_to_axis_angle(state["robot0_eef_quat"]),
                                  state["robot0_gripper_qpos"])).astype(np.float64)
    else:
        missing.append("observation/state")
        proprio = np.zeros(8)
    return {"observation/image": camera(obs.image), "observation/wrist_image": wrist_image,
            "observation/state": proprio, "prompt": str(instruction)}, missing


class RemotePolicy:
    needs_images = True

    def __init__(self, url: str, api_key: str | None = None, unnorm_key: str | None = None,
                 connect_timeout_s: float = 10.0, request_timeout_s: float = 60.0, reconnect_s: float = 10.0):
        if not url.startswith(("ws://", "wss://")):
            raise InputError(f"--policy {url}: a remote policy is a ws:// or wss:// URL (e.g. ws://127.0.0.1:8000)")
        self.url, self.api_key, self.unnorm_key = url, api_key, unnorm_key
        self.connect_timeout_s, self.request_timeout_s, self.reconnect_s = connect_timeout_s, request_timeout_s, reconnect_s
        self._conn: ExitStack | None = None
        self._ws: ClientConnection | None = None
        self._missing_reported = False
        self.reconnects = 0
        self._closed = False
        self._idle = threading.Event()  # no round trip in flight
        self._idle.set()
        self.metadata = self._connect()  # fails fast (one line) when nobody answers
        self.is_rtloop = self.metadata.get("server") == "rtloop"
        if self.is_rtloop:
            self.label = f"remote {url}: {self.metadata.get('label', 'rtloop serve')}"
        else:
            shown = {k: v for k, v in self.metadata.items() if isinstance(v, (str, int, float, bool))}
            self.label = f"remote {url}: openpi-protocol server {shown}"[:300]

    # --- the connection ----------------------------------------------------------------------------

    def _connect(self) -> dict:
        headers = {"Authorization": f"Api-Key {self.api_key}"} if self.api_key else None
        stack = ExitStack()
        try:
            ws = stack.enter_context(connect(self.url, compression=None, max_size=None, additional_headers=headers,
                                             open_timeout=self.connect_timeout_s))
            metadata = unpack(ws.recv(timeout=self.connect_timeout_s), max_bytes=1 << 20)
        except InvalidStatus as e:
            stack.close()
            hint = " (wrong or missing --api-key?)" if e.response.status_code in (401, 403) else ""
            raise PolicyError(f"{self.url} refused the connection: HTTP {e.response.status_code}{hint}") from None
        except (OSError, TimeoutError, InvalidURI, ConnectionClosed, ProtocolError) as e:
            stack.close()
            raise PolicyError(f"cannot connect to {self.url}: {type(e).__name__}: {e}") from None
        if not isinstance(metadata, dict):
            stack.close()
            raise PolicyError(f"{self.url} is not an openpi-protocol server: its first message is not a map")
        self._conn, self._ws = stack, ws
        return metadata

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = self._ws = None

    def _redial(self) -> None:
        """Exponential backoff until connected or `reconnect_s` has passed (then PolicyError)."""
        deadline, wait = clock.now() + self.reconnect_s, BACKOFF_START_S
        while True:
            try:
                self._connect()
                self.reconnects += 1
                return
            except PolicyError as e:
                if clock.now() + wait > deadline:
                    raise PolicyError(f"lost {self.url} and could not reconnect within {self.reconnect_s:g} s: "
                                      f"{e}") from None
            time.sleep(wait)
            wait = min(2 * wait, BACKOFF_MAX_S)

    def _round_trip(self, message: bytes):
        self._idle.clear()
        try:
            return self._send_and_wait(message)
        finally:
            self._idle.set()

    def _send_and_wait(self, message: bytes):
        for attempt in range(2):  # the second after a redial: inference is idempotent
            if self._closed:  # close() ran on another thread: no redial, the call's result is not wanted
                raise PolicyError(f"{self.url}: the remote policy is closed")
            if self._ws is None:
                self._redial()
            try:
                self._ws.send(message)
                return self._ws.recv(timeout=self.request_timeout_s)
            except TimeoutError:
                self._drop()
                raise PolicyError(f"{self.url} did not answer within {self.request_timeout_s:g} s") from None
            except (ConnectionClosed, OSError):
                self._drop()
                if attempt:
                    raise PolicyError(f"{self.url} dropped the connection twice in one request") from None

    # --- Policy ------------------------------------------------------------------------------------

    def _request(self, obs: Observation, instruction: str) -> tuple[dict, list[Alert]]:
        if obs.image is None:
            raise InputError("a remote policy needs the camera image: build the env with render=True")
        if self.is_rtloop:
            request = {"image": np.ascontiguousarray(obs.image), "instruction": instruction}
            if self.unnorm_key is not None:
                request["unnorm_key"] = self.unnorm_key
            return request, []
        request, missing = openpi_libero_request(obs, instruction)
        alerts = []
        if missing and not self._missing_reported:
            self._missing_reported = True
            alerts.append(Alert("remote_input", f"the env provides no {' or '.join(missing)}: sending zeros to "
                                                f"{self.url}, which may expect them"))
        return request, alerts

    def act(self, obs: Observation | np.ndarray, instruction: str) -> PolicyOutput:
        obs = obs if isinstance(obs, Observation) else Observation(obs)
        start = clock.now()
        request, alerts = self._request(obs, instruction)
        reply = self._round_trip(pack(request))
        if isinstance(reply, str):  # openpi's servers answer errors with a text frame, then close
            self._drop()
            raise PolicyError(f"{self.url}: {' '.join(reply.split())[:300]}")
        try:
            body = unpack(reply, max_bytes=1 << 24)
            actions = np.asarray(body["actions"], dtype=np.float64)
            raw = np.asarray(body.get("raw_actions", actions), dtype=np.float64)
        except (ProtocolError, KeyError, TypeError, ValueError) as e:
            raise PolicyError(f"{self.url} sent a reply without a numeric `actions` array: {e}") from None
        if actions.ndim == 1:
            actions, raw = actions[None], raw.reshape(1, -1)
        if actions.ndim != 2 or actions.shape[0] < 1 or actions.shape[1] != 7 or raw.shape != actions.shape:
            raise PolicyError(f"{self.url} sent actions of shape {actions.shape}; expected [H, 7]")
        round_trip = clock.now() - start
        timing = body.get("server_timing") if isinstance(body.get("server_timing"), dict) else {}
        infer = float(timing.get("infer_ms", 0.0)) / 1e3
        queue = float(timing.get("queue_ms", 0.0)) / 1e3
        timings = {"round_trip": round_trip, "server_infer": infer, "server_queue": queue,
                   "network": max(round_trip - infer - queue, 0.0)}
        for a in body.get("alerts") or []:
            if isinstance(a, dict):
                alerts.append(Alert(str(a.get("kind", "other")), f"server: {a.get('message', '')}"))
        return PolicyOutput(action=actions[0], raw_action=raw[0], timings=timings,
                            chunk=actions if len(actions) > 1 else None, alerts=alerts)

    def warmup(self, obs: Observation | np.ndarray, instruction: str) -> None:
        for _ in range(2):  # the first round trip pays for connection-level warmup on both ends
            self.act(obs, instruction)

    def close(self) -> None:
        """From any thread. The runtime closes its policy while an inference it cancelled may still be in
        flight on the policy thread: that request gets CLOSE_GRACE_S to end, and is never redialled."""
        self._closed = True
        self._idle.wait(CLOSE_GRACE_S)
        self._drop()


def make_remote_policy(url: str, api_key: str | None = None) -> RemotePolicy:
    """`--policy ws://HOST:PORT` (and `--api-key`) as the runtime builds it."""
    return RemotePolicy(url, api_key=api_key)
