"""Record raw agentview frames from real LIBERO, for the replay env (machines without LIBERO or MuJoCo).

    python -m rtloop.sim.record --suite libero_object --tasks 0 1 2 3 --frames 15 --out rtloop/data/libero_object_frames.npz

Per task: the official reset (init state `--episode`, 10 settle steps), then a scripted end-effector motion,
a loop in x/y/z (down then back up), so consecutive frames differ visibly. The first frame is the one
reset returns. Frames are stored exactly as LIBERO returns them (upside down), losslessly delta-encoded
(see rtloop.sim.replay) and compressed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from rtloop.errors import InputError, RtloopError
from rtloop.sim.replay import encode_frames
from rtloop.sim.versions import installed_mujoco


def scripted_action(step: int, period: int) -> np.ndarray:
    """OSC delta action (1.0 = 5 cm per step): one circle in x/y per period, so a replay loops smoothly."""
    phase = 2 * np.pi * step / period
    return np.array([np.cos(phase), np.sin(phase), -np.sin(phase), 0, 0, 0, -1.0])


def record(suite: str, task_ids: list[int], frames_per_task: int, episode: int, seed: int) -> dict[str, np.ndarray]:
    from rtloop.sim.libero_env import LiberoEnv

    frames, frame_task_ids, instructions = [], [], []
    for task_id in task_ids:
        env = LiberoEnv(suite=suite, task_id=task_id, seed=seed)
        try:
            frames.append(env.reset(episode).image)
            for step in range(frames_per_task - 1):
                frames.append(env.step(scripted_action(step, period=max(frames_per_task - 1, 1))).frame)
            instructions.append(env.instruction)
        finally:
            env.close()
        frame_task_ids += [task_id] * frames_per_task
        print(f"recorded {suite} task {task_id}: {env.instruction!r}", file=sys.stderr)
    frame_task_ids = np.array(frame_task_ids, dtype=np.int32)
    return {
        "frames_delta": encode_frames(np.stack(frames), frame_task_ids),
        "frame_task_ids": frame_task_ids,
        "task_ids": np.array(task_ids, dtype=np.int32),
        "instructions": np.array(instructions),
        "suite": np.array(suite),
        "episode": np.array(episode),
        "seed": np.array(seed),
        "mujoco": np.array(installed_mujoco() or ""),  # renders move with the version (rtloop.sim.versions)
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rtloop.sim.record", description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="libero_object")
    parser.add_argument("--tasks", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--frames", type=int, default=15, help="frames per task (the reset frame included)")
    parser.add_argument("--episode", type=int, default=0, help="init state index")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.frames < 1:
            raise InputError(f"--frames must be >= 1, got {args.frames}")
        recording = record(args.suite, args.tasks, args.frames, args.episode, args.seed)
    except RtloopError as e:
        print(f"record: error: {e}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **recording)
    size = args.out.stat().st_size
    print(f"wrote {args.out}: {len(recording['frame_task_ids'])} frames, {size / 1e6:.2f} MB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
