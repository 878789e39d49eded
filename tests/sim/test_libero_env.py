"""Real LIBERO (libero_object task 0) under the official eval protocol. One env for the whole module:
building one costs ~8 s, a reset ~3 s (robosuite rebuilds the MuJoCo model on every reset)."""

import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from rtloop.errors import InputError, SimError
from rtloop.sim import DEFAULT_RECORDING
from rtloop.sim.libero_env import DUMMY_ACTION, LiberoEnv, horizon_for
from rtloop.sim.replay import ReplayEnv

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env():
    env = LiberoEnv(suite="libero_object", task_id=0)
    yield env
    env.close()


def test_renders_only_the_policy_camera(env):
    robot_env = env._env.env
    assert robot_env.camera_names == ["agentview"]
    images = [
        name
        for name, observable in robot_env._observables.items()
        if observable.modality == "image" and observable.is_enabled()
    ]
    assert images == ["agentview_image"]  # no wrist camera, no depth, no segmentation


def test_task_metadata(env):
    assert env.instruction == "pick up the alphabet soup and place it in the basket"
    assert env.horizon == 280
    assert len(env.init_states) == 50


@pytest.fixture(scope="module")
def reset_frames(env):
    """Episodes 0, 1, then 0 again: leaves the env at the start of episode 0 for the step test."""
    return env.reset(0).image, env.reset(1).image, env.reset(0).image


def test_init_state_selects_a_reproducible_scene(reset_frames):
    first, other, again = reset_frames
    assert first.shape == (256, 256, 3) and first.dtype == np.uint8
    assert first.mean() > 30 and first.std() > 20  # a lit scene, not a black or blank buffer
    assert np.array_equal(first, again)
    assert np.abs(first.astype(int) - other).mean() > 1.0


def test_recording_matches_live_libero(reset_frames):
    """The committed recording is real LIBERO: its first frame is this env's episode-0 reset frame."""
    recorded = ReplayEnv(DEFAULT_RECORDING, suite="libero_object", task_id=0).reset(0).image
    # Another GL driver may shade a few pixels differently; another scene differs far more (> 1.0 above).
    assert np.abs(reset_frames[0].astype(int) - recorded).mean() < 0.5


def test_step_times_physics_and_render_inside_the_step(env, reset_frames):
    env.horizon = 25  # a short episode, to see `done` arrive exactly at the horizon
    try:
        results, walls = [], []
        for _ in range(25):
            start = time.perf_counter()
            results.append(env.step(DUMMY_ACTION))
            walls.append(time.perf_counter() - start)
    finally:
        env.horizon = horizon_for(env.suite)
    for result, wall in zip(results, walls):
        assert result.frame.shape == (256, 256, 3) and result.frame.dtype == np.uint8
        assert result.timings["physics"] > 0 and result.timings["render"] > 0
        assert result.timings["physics"] + result.timings["render"] <= wall
        assert not result.success  # holding still never puts the soup in the basket
    assert [r.done for r in results] == [False] * 24 + [True]


def test_episode_outside_init_states(env):
    with pytest.raises(InputError, match=r"episode 50 is outside the 50 init states .*\(0\.\.49\)"):
        env.reset(50)


def test_exception_inside_step_is_one_line_sim_error(env):
    with pytest.raises(SimError) as info:
        env.step(np.zeros(3))
    message = str(info.value)
    assert "\n" not in message
    assert "AssertionError" in message and "expected 7, got 3" in message


def test_unknown_suite_is_one_line_listing_the_suites():
    with pytest.raises(InputError) as info:
        LiberoEnv(suite="libero_objects")
    message = str(info.value)
    assert "\n" not in message
    assert "did you mean libero_object" in message
    assert "valid suites: libero_spatial, libero_object, libero_goal, libero_10, libero_90, and " in message


def test_task_id_out_of_range_names_the_range():
    pattern = r"task id 10 is out of range for libero_object: 0\.\.9 \(0=pick up the alphabet soup"
    with pytest.raises(InputError, match=pattern):
        LiberoEnv(suite="libero_object", task_id=10)


def test_broken_egl_is_one_line_naming_mujoco_gl():
    """A libEGL that cannot load (here: an empty file first on the library path) fails at import."""
    script = (
        "from rtloop.errors import SimError\n"
        "from rtloop.sim.libero_env import LiberoEnv\n"
        "try:\n    LiberoEnv()\n"
        "except SimError as e:\n    print(e)\n"
    )
    return_code, output = _run_with_broken_egl(script)
    assert return_code == 0, output
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    assert "MUJOCO_GL=egl" in lines[0] and "libEGL.so.1 cannot be loaded" in lines[0]


def _run_with_broken_egl(script):
    with tempfile.TemporaryDirectory() as fake_lib_dir:
        for name in ("libEGL.so", "libEGL.so.1"):  # every name PyOpenGL and MuJoCo try
            open(os.path.join(fake_lib_dir, name), "w").close()
        env_vars = {**os.environ, "MUJOCO_GL": "egl", "LD_LIBRARY_PATH": fake_lib_dir}
        done = subprocess.run([sys.executable, "-c", script], env=env_vars, capture_output=True, text=True)
    return done.returncode, done.stdout + done.stderr
