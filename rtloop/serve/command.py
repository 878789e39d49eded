"""`rtloop serve`: OpenVLA as a policy server in openpi's websocket protocol.

Safe by default: it binds 127.0.0.1. Any other address needs `--api-key KEY` (clients send
`Authorization: Api-Key KEY`) or `--insecure`, which warns on every start. Exit status: 0 on SIGTERM,
130 on Ctrl-C, 2 on bad input (one line, before the model loads: the options, then both ports are bound).
Requests that arrive while the model is busy are answered together, up to `--max-batch` per call.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path

from rtloop.serve.protocol import DEFAULT_MAX_MESSAGE_BYTES

# Graphed and compiled engines capture (and compile) every batch bucket up to --max-batch before serving:
# 8 is four buckets (1, 2, 4, 8) at start rather than all six.
DEFAULT_MAX_BATCH = 8


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; any other needs --api-key or --insecure)")
    p.add_argument("--port", type=int, default=8000, help="websocket port (default 8000, openpi's; 0 = any free)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="OpenVLA checkpoint directory (default weights/openvla-7b; when absent, the tiny "
                        "random-weight checkpoint `rtloop run` falls back to)")
    p.add_argument("--engine", default=None,
                   help="inference engine, as for rtloop run (default: compiled on CUDA, eager on CPU)")
    p.add_argument("--device", default="auto", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                   help=f"the most requests one model call takes, of those that arrived while the model was busy "
                        f"(a batch bucket: 1, 2, 4, ..., 32; default {DEFAULT_MAX_BATCH}); graphed and compiled "
                        "engines capture each bucket up to it at start")
    p.add_argument("--suite", default="libero_object",
                   help="LIBERO suite whose statistics are the default unnorm key (default libero_object)")
    p.add_argument("--unnorm-key", default=None, help="default action statistics key (requests may name another)")
    p.add_argument("--center-crop", action=argparse.BooleanOptionalAction, default=True,
                   help="90%% centre crop, on by default as in the official LIBERO eval; --no-center-crop for models "
                        "trained without")
    p.add_argument("--api-key", default=None, help="require `Authorization: Api-Key KEY` from every client")
    p.add_argument("--insecure", action="store_true",
                   help="serve a non-loopback address without a key (anyone who reaches the port drives the model)")
    p.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES,
                   help=f"largest request accepted (default {DEFAULT_MAX_MESSAGE_BYTES})")
    p.add_argument("--metrics-port", type=int, default=9465,
                   help="Prometheus /metrics port on 127.0.0.1 (default 9465, beside rtloop run's 9464; 0 = off)")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def validate(args: argparse.Namespace) -> None:
    """The cheap checks, before the model loads."""
    from rtloop.errors import InputError

    if args.api_key is not None and args.insecure:
        raise InputError("--api-key and --insecure contradict each other: pass one")
    if args.api_key is not None and (not args.api_key or not args.api_key.isascii() or not args.api_key.isprintable()):
        raise InputError("--api-key must be non-empty printable ASCII (it travels in an HTTP header)")
    if not is_loopback(args.host) and args.api_key is None and not args.insecure:
        raise InputError(f"--host {args.host} is not a loopback address: pass --api-key KEY (clients send "
                         "Authorization: Api-Key KEY), or --insecure to serve it without authentication")
    for name in ("port", "metrics_port"):
        value = getattr(args, name)
        if not 0 <= value <= 65535:
            raise InputError(f"--{name.replace('_', '-')} must be 0..65535 (got {value})")
    if args.max_message_bytes < 1024:
        raise InputError(f"--max-message-bytes must be >= 1024 (got {args.max_message_bytes})")
    from rtloop.policy.buckets import BATCH_BUCKETS
    from rtloop.policy.engines import check_engine_device
    from rtloop.commands.device import resolve_device

    if args.max_batch not in BATCH_BUCKETS:
        raise InputError(f"--max-batch must be one of {', '.join(map(str, BATCH_BUCKETS))} (the engines' batch "
                         f"buckets), got {args.max_batch}")

    args.device = resolve_device(args.device)
    if args.engine is None:
        args.engine = "compiled" if args.device.startswith("cuda") else "eager"
    check_engine_device(args.engine, args.device)


def build_backend(args: argparse.Namespace, checkpoint: Path):
    """Runs on the inference thread: the model is built, warmed up and used there."""
    import numpy as np

    from rtloop.fleet.fleet import warm_batches
    from rtloop.policy.openvla import OpenVLAPolicy
    from rtloop.runtime import heap
    from rtloop.serve.backend import OpenVLABackend
    from rtloop.sim.base import Observation

    policy = OpenVLAPolicy(checkpoint, unnorm_key=args.unnorm_key, suite=args.suite, device=args.device,
                           engine=args.engine, center_crop=args.center_crop, max_batch=args.max_batch)
    noise = Observation(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))  # not blank: no alert
    policy.warmup(noise, "warm up")
    warm_batches(policy, noise, "warm up", args.max_batch)  # every bucket up to it: none is built mid-serving
    policy.drain_alerts(0)  # the configuration's, in the server's log already: no client's request raised them
    heap.freeze()  # the warm model: no garbage collection walks it again mid-serving
    return OpenVLABackend(policy)


def main(args: argparse.Namespace) -> int:
    import logging
    import signal

    import anyio
    from prometheus_client import CollectorRegistry

    from rtloop.commands.policies import resolve_checkpoint
    from rtloop.serve.server import InferenceWorker, PolicyServer, ServerMetrics, bind

    validate(args)
    sock = bind(args.host, args.port)  # a port in use fails here, in a moment, not after the model loads
    metrics_server = worker = None
    try:
        registry = CollectorRegistry()
        if args.metrics_port:
            from rtloop.metrics.exporter import start_metrics_server

            metrics_server = start_metrics_server(args.metrics_port, registry)  # its series appear with the model
        checkpoint = resolve_checkpoint(args.checkpoint)
        logging.basicConfig(format="%(message)s", level=logging.WARNING, stream=sys.stderr)
        port = sock.getsockname()[1]
        if args.insecure:
            print(f"rtloop serve: WARNING: --insecure: {args.host}:{port} takes requests from anyone who can reach "
                  "it, without authentication", file=sys.stderr)
        print(f"rtloop serve: loading {checkpoint} (engine {args.engine} on {args.device}, batches of up to "
              f"{args.max_batch}: each batch bucket up to it is built before the server listens)", file=sys.stderr,
              flush=True)

        def metrics_for(backend) -> ServerMetrics:
            return ServerMetrics(args.engine, "random" if backend.random_weights else "real", registry)

        worker = InferenceWorker(lambda: build_backend(args, checkpoint), metrics_for)
        server = PolicyServer(worker, sock, args.api_key, args.max_message_bytes)

        def listening() -> None:
            metrics = f", metrics {metrics_server.url}" if metrics_server else ""
            print(f"rtloop serve: {worker.backend.metadata['label']}\n"
                  f"rtloop serve: listening on ws://{args.host}:{port} (health http://{args.host}:{port}/healthz"
                  f"{metrics})", file=sys.stderr, flush=True)

        async def serve_until_sigterm() -> None:
            stop = anyio.Event()

            async def on_sigterm() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM) as signals:
                    async for _ in signals:
                        stop.set()
                        return

            async with anyio.create_task_group() as tg:
                tg.start_soon(on_sigterm)
                await server.run(stop, listening)
                tg.cancel_scope.cancel()

        anyio.run(serve_until_sigterm)
    finally:
        if worker is not None:
            worker.close()
        if metrics_server is not None:
            metrics_server.close()
        sock.close()
    return 0
