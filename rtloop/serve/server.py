"""`rtloop serve`'s server: openpi's websocket protocol in front of one inference thread.

    connect (optional `Authorization: Api-Key <key>`) -> server sends its metadata map
    loop: client sends a request map -> server replies {"actions": [H, 7], "raw_actions": [H, 7],
          "server_timing": {"infer_ms", "queue_ms", "batch_size"}, "alerts"?}
    bad input -> one error TEXT frame naming the problem, then that connection is closed (1008)

Requests from every connection go to one batching task, which hands them to the one thread that owns the
model (rtloop.runtime.worker.WorkerThread): the GPU is one resource, so a request waits (`queue_ms`) rather
than competing for it. Whatever arrived while the model was busy goes into the next call: up to
`backend.max_batch` requests that share an unnorm key (one call normalises with one key's statistics), oldest
first, as one `backend.act_batch`. Each connection is its own stream of frames (`streams`), so the policy's
frame-to-frame guards compare a client's frame with that client's previous one. A batch that raises is run
again one request at a time: one client's bad input fails that client only.

The listening socket is bound before the model loads (`bind`), so a port in use fails in a moment, not
after minutes of loading; it listens only once the server runs, so until then clients are refused, not
left waiting. GET /healthz answers 200 without a handshake (and without a key: it says nothing but "ok").
"""

from __future__ import annotations

import errno
import hmac
import itertools
import logging
import math
import socket
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Callable, Protocol

import anyio
import anyio.lowlevel
import numpy as np
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from rtloop import clock
from rtloop.errors import InputError, UnnormKeyError
from rtloop.metrics.exporter import LATENCY_BUCKETS
from rtloop.policy.buckets import BATCH_BUCKETS, MAX_BATCH
from rtloop.runtime.worker import WorkerThread
from rtloop.serve.protocol import DEFAULT_MAX_MESSAGE_BYTES, ERROR_KINDS, ProtocolError, Request, pack, parse_request, unpack

log = logging.getLogger("rtloop.serve")

# request: message received -> reply sent; decode: msgpack + validation; queue: waiting for the worker;
# infer: the backend's whole call (processor + generate + detokenize for OpenVLA); encode: reply pack + send
SERVER_STAGES = ("request", "decode", "queue", "infer", "processor", "generate", "detokenize", "encode")
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
    max_batch: int  # the most requests one act_batch call takes

    def act_batch(self, requests: list[Request], streams: list[int]) -> list[Result]:
        """One result per request; streams[i] says which connection request i came from."""

    def end_stream(self, stream: int) -> None:
        """The connection is gone: forget what was kept about its frames."""


class ServerMetrics:
    """The server's Prometheus series, on their own registry. `engine` is the one label every series has."""

    def __init__(self, engine: str, policy_kind: str, registry: CollectorRegistry | None = None):
        self.registry = r = registry or CollectorRegistry()
        e = {"engine": engine}
        Gauge("rtloop_server_info", "Always 1; labels describe the served policy", ["engine", "policy"],
              registry=r).labels(**e, policy=policy_kind).set(1)
        self.connections = Gauge("rtloop_server_connections", "Open client connections", ["engine"],
                                 registry=r).labels(**e)
        self.waiting = Gauge("rtloop_server_requests_waiting", "Requests decoded and waiting for the model",
                             ["engine"], registry=r).labels(**e)
        requests = Counter("rtloop_server_requests", "Requests answered with actions, by request form",
                           ["engine", "form"], registry=r)
        self.requests = {form: requests.labels(**e, form=form) for form in ("openpi", "rtloop")}
        self.batch_size = Histogram("rtloop_server_batch_size", "Requests per act_batch call", ["engine"],
                                    registry=r, buckets=(*BATCH_BUCKETS, 2 * MAX_BATCH)).labels(**e)
        stage = Histogram("rtloop_server_stage_duration_seconds", "Server-side time per stage of a request",
                          ["engine", "stage"], registry=r, buckets=LATENCY_BUCKETS)
        self.stage = {s: stage.labels(**e, stage=s) for s in SERVER_STAGES}
        errors = Counter("rtloop_server_errors", "Refused requests and dropped connections, by kind",
                         ["engine", "kind"], registry=r)
        self.errors = {kind: errors.labels(**e, kind=kind) for kind in ERROR_KINDS}  # all exist, at 0


@dataclass
class Served:
    """A request's outcome: its result, or the exception its call raised."""

    result: Result | None
    error: Exception | None
    queue_s: float = 0.0
    infer_s: float = 0.0
    batch_size: int = 0


@dataclass(eq=False)
class _Job:
    request: Request
    stream: int
    queued_at: float = field(default_factory=clock.now)
    done: anyio.Event = field(default_factory=anyio.Event)
    served: Served | None = None
    taken: bool = False  # it went into a call
    abandoned: bool = False  # its client left first

    def finish(self, served: Served) -> None:
        self.served = served
        self.done.set()


@dataclass(eq=False)
class _Connection:
    ws: ServerConnection
    stream: int  # its frames' stream, for the policy's frame-to-frame guards
    job: _Job | None = None  # the request in flight


class InferenceWorker:
    """The one thread that owns the model: it builds the backend (so CUDA state lives where it runs), then
    runs every call to it, one at a time, until close()."""

    def __init__(self, build: Callable[[], Backend], metrics_for: Callable[[Backend], ServerMetrics]):
        self.thread = WorkerThread("rtloop-serve-infer")
        try:
            self.backend = self.thread.call(build)
            self.metrics = metrics_for(self.backend)
        except BaseException:
            self.thread.close()
            raise

    def close(self) -> None:
        self.thread.close()


def bind(host: str, port: int) -> socket.socket:
    """The server's socket, bound to host:port (port 0: any free one) but not yet listening. A port in
    use or an address that is not this machine's is an InputError, one line."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                            flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise InputError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio does: a restart is not refused
        sock.bind(address)
    except OSError as e:
        sock.close()
        hint = " (pick another --port, or 0 for any free one)" if e.errno == errno.EADDRINUSE else ""
        raise InputError(f"cannot serve on {host}:{port}: {e.strerror or e}{hint}") from None
    return sock


def _one_line(text: str, limit: int = 300) -> str:
    return " ".join(str(text).split())[:limit]


class PolicyServer:
    def __init__(self, worker: InferenceWorker, sock: socket.socket, api_key: str | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        """`sock`: from bind(); the server listens on it while run() runs, and closes it."""
        self.worker, self.backend, self.metrics = worker, worker.backend, worker.metrics
        self.sock = sock
        self.port = sock.getsockname()[1]
        self.api_key = api_key
        self.max_message_bytes = max_message_bytes
        self._metadata = pack(worker.backend.metadata)
        self._streams = itertools.count(1)  # stream 0 is the policy's own: its configuration and warm-up
        self._submit: MemoryObjectSendStream[_Job] | None = None

    async def run(self, stop: anyio.Event, on_listening: Callable[[], None] | None = None) -> None:
        """Serve until `stop` is set; on_listening() once clients can connect. Then every connection is
        closed, and the batching task ends (a call in flight finishes on the worker thread)."""
        submit, jobs = anyio.create_memory_object_stream[_Job](math.inf)  # a job per connection at most
        with submit, jobs:
            self._submit = submit
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._batches, jobs)
                async with serve(self._handle, sock=self.sock, compression=None, process_request=self._http,
                                 max_size=HARD_LIMIT_FACTOR * self.max_message_bytes):
                    if on_listening is not None:
                        on_listening()
                    await stop.wait()
                tg.cancel_scope.cancel()

    # --- the model side: one call at a time, each on everything that waits ---------------------------

    async def _batches(self, jobs: MemoryObjectReceiveStream[_Job]) -> None:
        waiting: list[_Job] = []  # in arrival order
        while True:
            if not waiting:
                waiting.append(await jobs.receive())
            while True:  # everything that arrived while the model was busy
                try:
                    waiting.append(jobs.receive_nowait())
                except anyio.WouldBlock:
                    break
            waiting = [j for j in waiting if not j.abandoned]
            if not waiting:
                await anyio.lowlevel.checkpoint()
                continue
            key = waiting[0].request.unnorm_key
            batch = [j for j in waiting if j.request.unnorm_key == key][:self.backend.max_batch]
            waiting = [j for j in waiting if j not in batch]
            for job in batch:
                job.taken = True
            self.metrics.waiting.dec(len(batch))
            await self._run(batch)

    async def _run(self, batch: list[_Job]) -> None:
        start = clock.now()
        try:
            results = await self.worker.thread.run(self.backend.act_batch, [j.request for j in batch],
                                                   [j.stream for j in batch])
        except Exception as e:
            if len(batch) == 1:
                batch[0].finish(Served(None, e))
            else:  # whose input was it: each alone
                for job in batch:
                    if not job.abandoned:
                        await self._run([job])
            return
        infer_s = clock.now() - start
        self.metrics.batch_size.observe(len(batch))
        for job, result in zip(batch, results, strict=True):
            job.finish(Served(result, None, start - job.queued_at, infer_s, len(batch)))

    # --- the connections -----------------------------------------------------------------------------

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
        conn = _Connection(ws, next(self._streams))
        self.metrics.connections.inc()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch, conn)
                await self._converse(conn)
                tg.cancel_scope.cancel()
        finally:
            self.metrics.connections.dec()
            self.worker.thread.submit(self.backend.end_stream, conn.stream)  # after its calls: one thread, in order

    async def _watch(self, conn: _Connection) -> None:
        """For the connection's lifetime: when its client leaves, the request in flight stops waiting."""
        await conn.ws.wait_closed()
        if conn.job is not None:
            conn.job.done.set()

    async def _converse(self, conn: _Connection) -> None:
        ws, m = conn.ws, self.metrics
        try:
            await ws.send(self._metadata)
            async for message in ws:
                received = clock.now()
                try:
                    request = parse_request(unpack(message, self.max_message_bytes))
                except ProtocolError as e:
                    return await self._refuse(ws, e.kind, str(e))
                decoded = clock.now()
                job = conn.job = _Job(request, conn.stream)
                m.waiting.inc()
                self._submit.send_nowait(job)
                await job.done.wait()
                conn.job = None
                served = job.served
                if served is None:  # the client left mid-request: the job is dropped if it has not started
                    job.abandoned = True
                    if not job.taken:
                        m.waiting.dec()
                    self._count_error("disconnected", f"{ws.remote_address} left mid-request")
                    return
                if isinstance(served.error, (InputError, UnnormKeyError)):  # valid shape, refused by the policy
                    return await self._refuse(ws, "bad_value", str(served.error))
                if served.error is not None:  # the model's fault (e.g. an ActionError): closed as openpi does
                    e = served.error
                    return await self._refuse(ws, "inference", f"{type(e).__name__}: {e}", code=1011)
                result = served.result
                replied = clock.now()
                reply = {"actions": result.actions, "raw_actions": result.raw_actions,
                         "server_timing": {"infer_ms": served.infer_s * 1e3, "queue_ms": served.queue_s * 1e3,
                                           "batch_size": served.batch_size}}
                if result.alerts:
                    reply["alerts"] = result.alerts
                await ws.send(pack(reply))
                done = clock.now()
                m.requests[request.form].inc()
                for stage, seconds in (("decode", decoded - received), ("queue", served.queue_s),
                                       ("infer", served.infer_s), ("encode", done - replied),
                                       ("request", done - received), *result.stages.items()):
                    if stage in m.stage:
                        m.stage[stage].observe(seconds)
        except ConnectionClosed as e:
            if e.sent is not None and e.sent.code == 1009:  # websockets refused a frame over the hard limit
                self._count_error("oversize", f"{ws.remote_address}: {e.sent.reason}")
            elif e.rcvd is None:  # no closing handshake: the client vanished
                self._count_error("disconnected", f"{ws.remote_address} dropped the connection")
