"""`rtloop serve`'s server: openpi's websocket protocol in front of one inference thread.

    connect (optional `Authorization: Api-Key <key>`) -> server sends its metadata map
    loop: client sends a request map -> server replies {"actions": [H, 7], "raw_actions": [H, 7],
          "server_timing": {"infer_ms", "queue_ms"}, "alerts"?}
    bad input -> one error TEXT frame naming the problem, then that connection is closed (1008)

Every connection's requests go through one queue to one worker thread that owns the model, so a request
waits (`queue_ms`) rather than competing for the GPU. The worker takes up to `backend.max_batch` requests
at a time and hands them to `backend.act_batch`: 1 today, a batched engine drains more later.
GET /healthz answers 200 without a handshake (and without a key: it says nothing but "ok").
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Callable, Protocol

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from rtloop import clock
from rtloop.errors import InputError, UnnormKeyError
from rtloop.metrics.exporter import LATENCY_BUCKETS
from rtloop.serve.protocol import DEFAULT_MAX_MESSAGE_BYTES, ERROR_KINDS, ProtocolError, Request, pack, parse_request, unpack

log = logging.getLogger("rtloop.serve")

# request: message received -> reply sent; decode: msgpack + validation; queue: waiting for the worker;
# infer: the backend's whole call (processor + generate + detokenize for OpenVLA); encode: reply pack + send
SERVER_STAGES = ("request", "decode", "queue", "infer", "processor", "generate", "detokenize", "encode")
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# Messages up to the limit are read and refused with a text frame; websockets itself drops a connection
# whose frame announces more than this many times the limit, before reading it (close code 1009).
HARD_LIMIT_FACTOR = 2
CLOSE_REASON_BYTES = 120  # a close frame's reason holds at most 123 bytes


@dataclass
class Result:
    actions: np.ndarray  # [H, 7] env-ready (LIBERO: gripper -1 open, +1 close)
    raw_actions: np.ndarray  # [H, 7] the model's own
    stages: dict[str, float] = field(default_factory=dict)  # seconds
    alerts: list[dict] = field(default_factory=list)  # {"kind", "message"}: suspected silent failures


class Backend(Protocol):
    metadata: dict  # sent to every client on connect
    max_batch: int  # how many queued requests act_batch takes at once

    def act_batch(self, requests: list[Request]) -> list[Result]: ...


class ServerMetrics:
    """The server's Prometheus series, on their own registry. `engine` is the one label every series has."""

    def __init__(self, engine: str, policy_kind: str, registry: CollectorRegistry | None = None):
        self.registry = r = registry or CollectorRegistry()
        e = {"engine": engine}
        Gauge("rtloop_server_info", "Always 1; labels describe the served policy", ["engine", "policy"],
              registry=r).labels(**e, policy=policy_kind).set(1)
        self.connections = Gauge("rtloop_server_connections", "Open client connections", ["engine"],
                                 registry=r).labels(**e)
        requests = Counter("rtloop_server_requests", "Requests answered with actions, by request form",
                           ["engine", "form"], registry=r)
        self.requests = {form: requests.labels(**e, form=form) for form in ("openpi", "rtloop")}
        self.batch_size = Histogram("rtloop_server_batch_size", "Requests per act_batch call", ["engine"],
                                    registry=r, buckets=BATCH_BUCKETS).labels(**e)
        stage = Histogram("rtloop_server_stage_duration_seconds", "Server-side time per stage of a request",
                          ["engine", "stage"], registry=r, buckets=LATENCY_BUCKETS)
        self.stage = {s: stage.labels(**e, stage=s) for s in SERVER_STAGES}
        errors = Counter("rtloop_server_errors", "Refused requests and dropped connections, by kind",
                         ["engine", "kind"], registry=r)
        self.errors = {kind: errors.labels(**e, kind=kind) for kind in ERROR_KINDS}  # all exist, at 0


@dataclass
class _Job:
    request: Request
    future: Future
    queued_at: float


class InferenceWorker:
    """The one thread that owns the model: it builds the backend (so CUDA state lives where it runs), then
    serves the queue until close()."""

    def __init__(self, build: Callable[[], Backend], metrics_for: Callable[[Backend], ServerMetrics]):
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._ready: Future = Future()
        self._thread = threading.Thread(target=self._run, args=(build, metrics_for), name="rtloop-serve-infer")
        self._thread.start()
        try:
            self.backend, self.metrics = self._ready.result()
        except BaseException:
            self._thread.join()
            raise

    def submit(self, request: Request) -> Future:
        job = _Job(request, Future(), clock.now())
        self._queue.put(job)
        return job.future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self, build, metrics_for) -> None:
        try:
            backend = build()
            metrics = metrics_for(backend)
        except BaseException as e:
            self._ready.set_exception(e)
            return
        self._ready.set_result((backend, metrics))
        while (job := self._queue.get()) is not None:
            jobs = [job]
            while len(jobs) < backend.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)  # close() after this batch
                    break
                jobs.append(more)
            jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]  # clients gone meanwhile
            if not jobs:
                continue
            start = clock.now()
            try:
                results = backend.act_batch([j.request for j in jobs])
            except Exception as e:
                for j in jobs:
                    j.future.set_exception(e)
                continue
            infer_s = clock.now() - start
            metrics.batch_size.observe(len(jobs))
            for j, result in zip(jobs, results):
                j.future.set_result((result, start - j.queued_at, infer_s))


def _one_line(text: str, limit: int = 300) -> str:
    return " ".join(str(text).split())[:limit]


class PolicyServer:
    def __init__(self, worker: InferenceWorker, host: str = "127.0.0.1", port: int = 8000,
                 api_key: str | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self.worker, self.metrics = worker, worker.metrics
        self.host, self.port = host, port
        self.api_key = api_key
        self.max_message_bytes = max_message_bytes
        self._metadata = pack(worker.backend.metadata)

    async def run(self, stop: asyncio.Event, on_listening: Callable[[int], None] | None = None) -> None:
        """Serve until `stop` is set. on_listening gets the bound port (useful with port 0)."""
        async with serve(self._handle, self.host, self.port, compression=None, process_request=self._http,
                         max_size=HARD_LIMIT_FACTOR * self.max_message_bytes) as server:
            if on_listening is not None:
                on_listening(server.sockets[0].getsockname()[1])
            await stop.wait()

    def _http(self, connection: ServerConnection, request):
        if request.path == "/healthz":
            return connection.respond(HTTPStatus.OK, "ok\n")
        if self.api_key is not None:
            got = request.headers.get("Authorization", "").encode("utf-8", "replace")
            if not hmac.compare_digest(got, f"Api-Key {self.api_key}".encode()):
                self._count_error("auth", f"refused {connection.remote_address}: missing or wrong API key")
                return connection.respond(HTTPStatus.UNAUTHORIZED, "missing or wrong API key: send the header "
                                                                   "Authorization: Api-Key <key>\n")
        return None

    def _count_error(self, kind: str, message: str) -> None:
        self.metrics.errors[kind].inc()
        log.warning("rtloop serve: %s: %s", kind, message)

    async def _refuse(self, ws: ServerConnection, kind: str, message: str, code: int = 1008) -> None:
        message = _one_line(message)
        self._count_error(kind, message)
        await ws.send(f"rtloop serve: {kind}: {message}")
        reason = message.encode()[:CLOSE_REASON_BYTES].decode("utf-8", "ignore")
        await ws.close(code, reason)

    async def _handle(self, ws: ServerConnection) -> None:
        m = self.metrics
        m.connections.inc()
        closed = asyncio.ensure_future(ws.wait_closed())  # one per connection: a client leaving mid-request
        try:
            await ws.send(self._metadata)
            async for message in ws:
                received = clock.now()
                try:
                    request = parse_request(unpack(message, self.max_message_bytes))
                except ProtocolError as e:
                    return await self._refuse(ws, e.kind, str(e))
                decoded = clock.now()
                job = asyncio.wrap_future(self.worker.submit(request))
                await asyncio.wait((job, closed), return_when=asyncio.FIRST_COMPLETED)
                if not job.done():  # the client left mid-request: drop the job if it has not started
                    job.cancel()
                    self._count_error("disconnected", f"{ws.remote_address} left mid-request")
                    return
                try:
                    result, queue_s, infer_s = job.result()
                except (InputError, UnnormKeyError) as e:  # valid shape, refused by the policy: bad input
                    return await self._refuse(ws, "bad_value", str(e))
                except Exception as e:  # the model's fault (e.g. an ActionError): closed as openpi does
                    return await self._refuse(ws, "inference", f"{type(e).__name__}: {e}", code=1011)
                replied = clock.now()
                reply = {"actions": result.actions, "raw_actions": result.raw_actions,
                         "server_timing": {"infer_ms": infer_s * 1e3, "queue_ms": queue_s * 1e3}}
                if result.alerts:
                    reply["alerts"] = result.alerts
                await ws.send(pack(reply))
                done = clock.now()
                m.requests[request.form].inc()
                for stage, seconds in (("decode", decoded - received), ("queue", queue_s), ("infer", infer_s),
                                       ("encode", done - replied), ("request", done - received),
                                       *result.stages.items()):
                    if stage in m.stage:
                        m.stage[stage].observe(seconds)
        except ConnectionClosed as e:
            if e.sent is not None and e.sent.code == 1009:  # websockets refused a frame over the hard limit
                self._count_error("oversize", f"{ws.remote_address}: {e.sent.reason}")
            elif e.rcvd is None:  # no closing handshake: the client vanished
                self._count_error("disconnected", f"{ws.remote_address} dropped the connection")
        finally:
            closed.cancel()
            m.connections.dec()
