"""Fakes for the runtime's logic tests: an env, a policy and a clock that run in microseconds and decide
every timing themselves, so the tests are deterministic. (The real LIBERO and OpenVLA runs are the slow
tests in test_run_cli.py and test_faults.py.)"""

from __future__ import annotations

import threading

import anyio.lowlevel
import numpy as np

from rtloop.policy.base import PolicyOutput
from rtloop.runtime.records import InferenceRecord
from rtloop.runtime.summary import RecordLog
from rtloop.sim.base import Observation, StepResult


class FakeClock:
    """A wall clock that only moves when told: sleeping jumps to the deadline, an env step advances it by
    the step's duration (as real time would pass while the sim thread works)."""

    label = "fake"

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    async def sleep_until(self, t: float) -> None:
        self.t = max(self.t, t)
        await anyio.lowlevel.checkpoint()

    def advance(self, dt: float) -> None:
        self.t += dt


class FakeEnv:
    """Frames are 2x2 images holding (episode, steps so far, a checksum of the actions applied), so a test
    can tell which frame an action was computed from and which actions reached the env."""

    suite, task_id, instruction, label = "fake_suite", 0, "do the thing", "fake env"

    def __init__(self, horizon: int = 50, clock: FakeClock | None = None, step_s=0.01) -> None:
        self.horizon = horizon
        self.clock = clock
        self.step_s = step_s  # seconds per step, or a function of the step index
        self.applied: list[np.ndarray] = []
        self.on_step = None  # called with the step index before the step (a test's hook)

    def _obs(self) -> Observation:
        checksum = int(sum(float(a.sum()) * (i + 1) for i, a in enumerate(self.applied)) * 1000) % 251
        return Observation(np.array([[[self.episode, self.steps, checksum]] * 2] * 2, dtype=np.uint8))

    def reset(self, episode: int) -> Observation:
        self.episode, self.steps, self.applied = episode, 0, []
        return self._obs()

    def step(self, action: np.ndarray) -> StepResult:
        if self.on_step is not None:
            self.on_step(self.steps)
        if self.clock is not None:
            self.clock.advance(self.step_s(self.steps) if callable(self.step_s) else self.step_s)
        self.applied.append(np.array(action, dtype=np.float64))
        self.steps += 1
        return StepResult(self._obs(), done=self.steps >= self.horizon, success=False,
                          timings={"physics": 0.0, "render": 0.0})

    def close(self) -> None:
        pass


class FakePolicy:
    """The action is a function of the frame (so equal frames give equal actions); `hook(call)` runs at the
    start of each call (a test's way to block or fail it)."""

    label, needs_images = "fake policy", True

    def __init__(self, hook=None) -> None:
        self.calls = 0
        self.hook = hook
        self.frames: list[np.ndarray] = []

    def act(self, obs: Observation, instruction: str) -> PolicyOutput:
        self.calls += 1
        if self.hook is not None:
            self.hook(self.calls)
        self.frames.append(obs.image.copy())
        episode, steps, checksum = (int(v) for v in obs.image[0, 0])
        action = np.array([steps / 100, checksum / 1000, 0, 0, 0, 0, 1.0 if steps % 2 else -1.0])
        return PolicyOutput(action=action, raw_action=action, timings={"generate": 0.001})

    def warmup(self, obs: Observation, instruction: str) -> None:
        pass

    def close(self) -> None:
        pass


class Blocker:
    """A hook that blocks chosen calls until released (a slow inference whose length the test decides)."""

    def __init__(self, calls: set[int]) -> None:
        self.calls = calls
        self.release = threading.Event()
        self.entered = threading.Event()

    def __call__(self, call: int) -> None:
        if call in self.calls:
            self.entered.set()
            self.release.wait(timeout=30)


class ChunkedFakePolicy(FakePolicy):
    """Returns a chunk of `horizon` actions per call; action i of the chunk for the frame published before
    step k is [(k + i) / 100, call / 100, 0, 0, 0, 0, -1]: which step it was planned for, and by which call,
    can be read back from the actions the env applied."""

    label = "fake chunked policy"

    def __init__(self, horizon: int = 4, hook=None) -> None:
        super().__init__(hook)
        self.horizon = horizon

    def act(self, obs: Observation, instruction: str) -> PolicyOutput:
        super().act(obs, instruction)
        steps = int(obs.image[0, 0, 1])
        chunk = np.array([[(steps + i) / 100, self.calls / 100, 0, 0, 0, 0, -1.0] for i in range(self.horizon)])
        return PolicyOutput(action=chunk[0], raw_action=chunk[0], timings={"generate": 0.001}, chunk=chunk)


class InferenceWatch(RecordLog):
    """A record log whose `delivered` is set at the first inference record: a test holds the sim's first
    step on it, so that an action exists before the episode can end."""

    def __init__(self) -> None:
        super().__init__()
        self.delivered = threading.Event()

    def on_record(self, record) -> None:
        super().on_record(record)
        if isinstance(record, InferenceRecord):
            self.delivered.set()

    def hold_first_step(self, env: FakeEnv) -> None:
        env.on_step = lambda step: self.delivered.wait(timeout=10) if step == 0 else None
