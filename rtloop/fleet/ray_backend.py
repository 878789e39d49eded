"""`--backend ray`: the env workers as Ray actors, the policy as a Ray actor holding a GPU (one replica per
GPU of the cluster; one on the CPU where it has none). The fleet (rtloop.fleet.fleet) is the same: only
the links differ. Frames are numpy arrays through Ray's object store, with Ray's own serialization.

Without --address a local cluster is started on loopback (num_cpus = this machine's cores, no dashboard),
so the same command works on a laptop; with one, it joins that cluster (`ray start --head` on the head).

Timestamps: an action's age is measured on its env's own clock (the frame time goes out and comes back).
The frame age of an inference subtracts an env node's clock from the driver's: across machines it is
only as good as their clock sync.
"""

from __future__ import annotations

import asyncio
import os
import socket

import anyio

from rtloop.errors import InputError, WorkerError
from rtloop.fleet.fleet import PendingFrame, run_batch
from rtloop.fleet.worker import EnvWorker
from rtloop.runtime import heap
from rtloop.runtime.mailbox import Frame
from rtloop.sim.base import Observation

CONNECT_TIMEOUT_S = 3.0
ENV_VARS = ("MUJOCO_GL", "PYOPENGL_PLATFORM", "PYTHONPATH", "RTLOOP_AUTOTUNE", "TRITON_INTERPRET")


def check_address(address: str | None) -> None:
    """An address that nothing answers at is one line, in seconds (ray.init itself retries for long)."""
    if address is None or address == "auto":
        return
    rest = address.removeprefix("ray://")
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"--address {address}: expected HOST:PORT (e.g. 10.0.0.5:6379) or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise InputError(f"--address {address}: no Ray cluster answers there ({e.strerror or e}); start one with "
                         "`ray start --head` or leave --address out for a local cluster") from None


def start_ray(address: str | None, num_cpus: int | None = None) -> None:
    import ray

    runtime_env = {"env_vars": {k: os.environ[k] for k in ENV_VARS if k in os.environ}}
    try:
        if address is None:
            ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1",
                     log_to_driver=False, runtime_env=runtime_env, configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=False, runtime_env=runtime_env, configure_logging=False)
    except ConnectionError as e:
        raise InputError(f"--address {address}: {str(e).strip().splitlines()[0]}") from None


def cluster_resources() -> tuple[int, int]:
    """(CPUs, GPUs) of the cluster."""
    import ray

    res = ray.cluster_resources()
    return int(res.get("CPU", 0)), int(res.get("GPU", 0))


class OutboxLink:
    """Inside an env actor: what the worker ships waits here until the driver pulls it (`take`). One frame
    slot, as the mailbox: a frame the driver has not pulled yet is overwritten and counted as dropped."""

    def __init__(self) -> None:
        self.worker: EnvWorker | None = None
        self.frame: tuple | None = None
        self.records: list[tuple] = []
        self._wake: anyio.Event | None = None

    def _notify(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def ship(self, episode: int, frame: Frame) -> None:
        if self.frame is not None:
            self.worker.mailbox.dropped += 1
        self.frame = ("frame", episode, frame.seq, frame.captured_at, frame.obs.image, frame.obs.state)
        self._notify()

    def emit(self, kind: str, record: dict) -> None:
        self.records.append(("record", kind, record))
        self._notify()

    async def take(self) -> list[tuple]:
        while self.frame is None and not self.records:
            self._wake = anyio.Event()
            await self._wake.wait()
        out = ([self.frame] if self.frame is not None else []) + self.records
        self.frame, self.records = None, []
        return out


def _remote_classes():
    """The actor classes, made when Ray is imported (rtloop imports without Ray)."""
    import ray

    class RayEnvActor:
        def __init__(self, spec: dict, index: int) -> None:
            self.link = OutboxLink()
            self.worker = EnvWorker(spec, index, self.link)
            self.link.worker = self.worker

        def pid(self) -> int:
            return os.getpid()

        async def prepare(self, task: int, episode: int) -> tuple:
            frame = await asyncio.to_thread(self.worker.prepare, task, episode)
            return frame.seq, frame.captured_at, frame.obs.image, frame.obs.state, self.worker.describe()

        async def run_episode(self, task: int, episode: int) -> None:
            await self.worker.run_episode(task, episode)

        async def messages(self) -> list[tuple]:
            return await self.link.take()

        async def action(self, *action) -> None:
            self.worker.on_action(*action)

        async def abort(self, episode: int, kind: str, message: str) -> None:
            self.worker.on_abort(episode, kind, message)

        async def close(self) -> None:
            await asyncio.to_thread(self.worker.close)

    class RayPolicyActor:
        def __init__(self, build, build_args: tuple) -> None:
            self.policy = build(*build_args)

        def describe(self) -> tuple[str, bool]:
            return self.policy.label, self.policy.needs_images

        def act_batch(self, observations, instructions, streams):
            return run_batch(self.policy, observations, instructions, streams)

        def warmup(self, obs, instruction) -> None:
            self.policy.warmup(obs, instruction)

        def freeze_heap(self) -> None:
            heap.freeze()

        def close(self) -> None:
            self.policy.close()

    return ray.remote(RayEnvActor), ray.remote(RayPolicyActor)


class RayPolicy:
    """The driver's proxy of a policy actor: a Policy whose calls block on Ray (on the policy thread)."""

    def __init__(self, actor) -> None:
        import ray

        self.actor, self._get = actor, ray.get
        self.label, self.needs_images = ray.get(actor.describe.remote())
        self.label += " [Ray actor]"

    def act_batch(self, observations, instructions, streams=None):
        streams = list(range(len(observations))) if streams is None else streams
        return self._get(self.actor.act_batch.remote(observations, instructions, streams))

    def act(self, obs, instruction):
        return self.act_batch([obs], [instruction])[0]

    def warmup(self, obs, instruction) -> None:
        self._get(self.actor.warmup.remote(obs, instruction))

    def freeze_heap(self) -> None:
        """The actor's process holds the warm model: its heap is frozen there (rtloop.runtime.heap)."""
        self._get(self.actor.freeze_heap.remote())

    def close(self) -> None:
        self._get(self.actor.close.remote())


class RayEnvLink:
    def __init__(self, actor_class, index: int, spec: dict, num_cpus: float) -> None:
        self.index = index
        self.actor = actor_class.options(num_cpus=num_cpus, max_concurrency=64).remote(spec, index)
        self.pid: int | None = None

    async def _call(self, method, *args):
        import ray

        try:
            return await method.remote(*args)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise WorkerError(f"env {self.index}: its Ray actor died ({reason})") from None

    async def prepare(self, task: int, episode: int) -> tuple[Observation, dict]:
        self.pid = await self._call(self.actor.pid)
        _, _, image, state, info = await self._call(self.actor.prepare, task, episode)
        return Observation(image, state), info

    def start(self, task: int, episode: int) -> None:
        self.actor.run_episode.remote(task, episode)  # its records, the last included, come through messages

    def send_action(self, *answer) -> bool:
        self.actor.action.remote(*answer)
        return True

    def abort(self, episode: int, kind: str, message: str) -> None:
        self.actor.abort.remote(episode, kind, message)

    async def receive(self) -> list[tuple]:
        out = []
        for message in await self._call(self.actor.messages):
            if message[0] == "frame":
                _, episode, seq, captured_at, image, state = message
                obs = Observation(image, state)
                out.append(("frame", PendingFrame(episode, seq, captured_at, lambda obs=obs: obs)))
            else:
                out.append(message)
        return out

    def close(self) -> None:
        import ray

        try:
            ray.get(self.actor.close.remote(), timeout=30)
        except Exception:  # dead already, or stuck: it goes either way
            pass
        ray.kill(self.actor)


class RayBackend:
    """Env actors and policy actors on a Ray cluster (started here when there is no --address)."""

    def __init__(self, device: str, spec: dict, envs: int, build, build_args: tuple) -> None:
        """build(*build_args) -> Policy runs in each policy actor (rtloop.commands.policies.build_policy)."""
        import ray

        from rtloop.runtime.worker import WorkerThread

        self.spec = spec
        cpus, gpus = cluster_resources()
        self.env_cpus = min(1.0, cpus / envs) if cpus else 0.0  # --oversubscribe: a share of a core each
        self.env_class, policy_class = _remote_classes()
        replicas = max(1, gpus) if device.startswith("cuda") else 1
        options = {"num_gpus": 1, "num_cpus": 0} if device.startswith("cuda") else {"num_cpus": 0}
        actors = [policy_class.options(**options).remote(build, build_args) for _ in range(replicas)]
        self.policies = []
        try:
            for i, actor in enumerate(actors):
                self.policies.append((RayPolicy(actor), WorkerThread(f"rtloop-policy-{i}")))
        except ray.exceptions.RayTaskError as e:  # the policy's own one-line error, raised in its actor
            raise e.as_instanceof_cause() from None

    def make_link(self, index: int) -> RayEnvLink:
        return RayEnvLink(self.env_class, index, self.spec, self.env_cpus)

    def close(self) -> None:
        import ray

        for policy, thread in self.policies:
            try:
                thread.call(policy.close)
            finally:
                thread.close()
        ray.shutdown()
