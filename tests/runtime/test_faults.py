"""A policy or sim exception mid-run ends that episode cleanly: recorded, the trace keeps what came before,
the next episode runs, and no thread is left behind. Fault injectors wrap the real tiny OpenVLA policy and
the replay env (recorded LIBERO frames, the same loop): the claim is the runtime's, and a LIBERO build and
two resets cost 12 s of the 2-core CI run."""

import threading

import anyio
import pytest

from rtloop.policy.openvla import OpenVLAPolicy
from rtloop.runtime.loop import LoopConfig, Runtime
from rtloop.runtime.records import Fanout
from rtloop.runtime.summary import RecordLog
from rtloop.runtime.trace import TraceSink, read_trace
from rtloop.runtime.worker import WorkerThread
from rtloop.sim import make_env

pytestmark = pytest.mark.slow


class PolicyFailsAt:
    def __init__(self, inner, call: int):
        self.inner, self.fail_at, self.calls, self.label = inner, call, 0, inner.label

    def act(self, frame, instruction):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("injected policy failure")
        return self.inner.act(frame, instruction)


class EnvFailsAt:
    def __init__(self, inner, step: int):
        self.inner, self.fail_at, self.steps = inner, step, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def reset(self, episode):
        self.steps = 0
        return self.inner.reset(episode)

    def step(self, action):
        if self.steps == self.fail_at:
            raise RuntimeError("injected sim failure")
        self.steps += 1
        return self.inner.step(action)


def test_policy_and_sim_failures_end_their_episode_and_keep_the_trace(tiny_checkpoint, tmp_path):
    sim_thread, policy_thread = WorkerThread("rtloop-sim"), WorkerThread("rtloop-policy")
    env = sim_thread.call(make_env, "replay", "libero_object", 0)
    try:
        policy = policy_thread.call(OpenVLAPolicy, tiny_checkpoint)
        log, trace = RecordLog(), TraceSink(tmp_path / "trace.jsonl")
        config = LoopConfig(rate=10, max_steps=20)

        async def main():
            runtime = Runtime(env, PolicyFailsAt(policy, 4), sim_thread, policy_thread, Fanout([log, trace]), config)
            first = await runtime.run_episode(0)
            runtime.policy, runtime.env = policy, EnvFailsAt(env, 6)
            second = await runtime.run_episode(1)
            return first, second

        first, second = anyio.run(main)
        trace.close()
    finally:
        sim_thread.call(env.close)
        sim_thread.close()
        policy_thread.close()

    assert first.error == "policy: RuntimeError: injected policy failure" and not first.success
    assert second.error == "sim: RuntimeError: injected sim failure" and second.steps == 6
    records = read_trace(tmp_path / "trace.jsonl")
    errors = [r for r in records if r["kind"] == "error"]
    assert [(e["error_kind"], e["message"]) for e in errors] == [
        ("policy", "RuntimeError: injected policy failure"),
        ("sim", "RuntimeError: injected sim failure"),
    ]
    ticks = {ep: [r for r in records if r["kind"] == "tick" and r["episode"] == ep] for ep in (0, 1)}
    inferences = [r for r in records if r["kind"] == "inference" and r["episode"] == 0]
    assert len(inferences) == 3  # the three calls before the failing one
    assert len(ticks[0]) == first.steps and first.steps >= 1
    assert [t["step"] for t in ticks[1]] == list(range(6))  # everything before the failing step
    assert [r["kind"] for r in records].count("episode") == 2
    assert not [t.name for t in threading.enumerate() if t.name.startswith("rtloop-")]


def test_a_dead_policy_child_is_reported_and_replaced(tiny_checkpoint):
    """kill -9 of the policy process: the call in flight reports it by signal, the next call gets a new
    child (the runtime ends that episode on the error; the next episode runs against the new child)."""
    import argparse
    import os
    import signal

    import numpy as np

    from rtloop.commands.policies import build_policy
    from rtloop.commands.run import add_arguments, validate
    from rtloop.errors import PolicyError
    from rtloop.sim.base import Observation

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--checkpoint", str(tiny_checkpoint), "--policy-process", "--device", "cpu",
                              "--sim", "replay"])
    validate(args)
    policy = build_policy(args, tiny_checkpoint, "cpu")
    obs = Observation(np.full((256, 256, 3), 90, np.uint8))
    try:
        assert policy.act(obs, "pick up the ketchup").action.shape == (7,)
        first = policy._process.pid
        os.kill(first, signal.SIGKILL)
        with pytest.raises(PolicyError, match=r"^policy process died \(signal 9\)$"):
            policy.act(obs, "pick up the ketchup")
        assert policy.act(obs, "pick up the ketchup").action.shape == (7,)
        assert policy._process.pid != first
    finally:
        policy.close()
