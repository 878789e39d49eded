"""The replay env on the committed recording of real LIBERO frames. Needs neither LIBERO nor MuJoCo."""

import subprocess
import sys

import numpy as np
import pytest

from rtloop.errors import InputError
from rtloop.sim import DEFAULT_RECORDING, make_env
from rtloop.sim.libero_env import SUITE_HORIZONS, horizon_for
from rtloop.sim.replay import decode_frames, encode_frames
from rtloop.sim.versions import PINNED_MUJOCO


def test_committed_recording_is_small_and_complete():
    assert DEFAULT_RECORDING.stat().st_size <= 4_000_000
    with np.load(DEFAULT_RECORDING) as data:
        assert str(data["suite"]) == "libero_object"
        assert len(data["frame_task_ids"]) >= 30
        assert len(data["task_ids"]) == len(data["instructions"]) >= 2
        assert str(data["mujoco"]) == PINNED_MUJOCO  # rendered as the pinned LIBERO renders (LIBERO#88)


def test_replay_serves_recorded_frames_in_order_and_loops():
    env = make_env("replay", suite="libero_object", task_id=1)
    assert env.label == "replay (recorded LIBERO frames, actions ignored)"
    assert env.instruction == "pick up the cream cheese and place it in the basket"
    assert env.horizon == 280
    first = env.reset(0).image
    assert first.shape == (256, 256, 3) and first.dtype == np.uint8 and first.std() > 20
    frames = [first] + [env.step(np.zeros(7)).frame for _ in range(len(env.frames))]
    assert all(not np.array_equal(a, b) for a, b in zip(frames[:-2], frames[1:-1]))  # the arm moves
    assert np.array_equal(frames[-1], first)  # looped back to the start
    result = env.step(None)
    assert result.timings == {"physics": 0.0, "render": 0.0}
    assert not result.success and not result.done


def test_replay_is_done_at_the_horizon():
    env = make_env("replay")
    env.reset(0)
    done = [env.step(None).done for _ in range(env.horizon)]
    assert done == [False] * (env.horizon - 1) + [True]


def test_delta_encoding_is_lossless():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(7, 4, 5, 3), dtype=np.uint8)
    task_ids = np.array([3, 3, 3, 5, 5, 8, 8])
    assert np.array_equal(decode_frames(encode_frames(frames, task_ids), task_ids), frames)


def test_horizons_per_suite():
    assert SUITE_HORIZONS == {
        "libero_spatial": 220,
        "libero_object": 280,  # not the chapter's 300
        "libero_goal": 300,
        "libero_10": 520,
        "libero_90": 400,
    }
    assert horizon_for("libero_object_with_mug") == 280
    assert horizon_for("libero_mine") == 520


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (dict(kind="mujoco"), r"unknown sim kind 'mujoco'; valid kinds: libero, replay"),
        (dict(kind="replay", suite="libero_goal"), r"records suite 'libero_object', not 'libero_goal'"),
        (dict(kind="replay", task_id=9), r"no frames of libero_object task 9; recorded tasks: \[0, 1, 2, 3\]"),
        (dict(kind="replay", replay_path="/nonexistent.npz"), r"replay recording not found: /nonexistent.npz"),
    ],
)
def test_bad_input_is_one_line(kwargs, pattern):
    with pytest.raises(InputError, match=pattern) as info:
        make_env(**kwargs)
    assert "\n" not in str(info.value)


def test_replay_episode_range():
    with pytest.raises(InputError, match=r"episode -1 is outside the 50 init states"):
        make_env("replay").reset(-1)


def test_record_rejects_bad_frame_count(tmp_path):
    out = tmp_path / "x.npz"
    cmd = [sys.executable, "-m", "rtloop.sim.record", "--frames", "0", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip() == "record: error: --frames must be >= 1, got 0"
    assert not out.exists()
