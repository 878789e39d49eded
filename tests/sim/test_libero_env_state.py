"""Real LIBERO built with render=False: no renderer, no image, and the privileged state in every Observation."""

import numpy as np
import pytest

from rtloop.sim.libero_env import DUMMY_ACTION, LiberoEnv

pytestmark = pytest.mark.slow

OBJECTS = ("alphabet_soup_1", "basket_1", "salad_dressing_1", "cream_cheese_1", "milk_1", "tomato_sauce_1",
           "butter_1")  # libero_object task 0's BDDL scene


@pytest.fixture(scope="module")
def env():
    env = LiberoEnv(suite="libero_object", task_id=0, render=False)
    yield env
    env.close()


def test_nothing_is_rendered(env):
    robot_env = env._env.env
    assert robot_env.has_offscreen_renderer is False and robot_env.use_camera_obs is False
    assert not [o for o in robot_env._observables.values() if o.modality == "image" and o.is_enabled()]
    obs = env.reset(0)
    assert obs.image is None
    result = env.step(DUMMY_ACTION)
    assert result.obs.image is None and result.frame is None
    assert result.timings["render"] == 0.0 and result.timings["physics"] > 0


def test_state_has_the_robot_and_every_object(env):
    state = env.reset(0).state
    expected = {"robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"}
    expected |= {f"{name}_{field}" for name in OBJECTS for field in ("pos", "quat", "bbox")}
    assert set(state) == expected
    assert state["robot0_eef_pos"].shape == (3,) and state["robot0_gripper_qpos"].shape == (2,)
    for name in OBJECTS:
        assert state[f"{name}_pos"].shape == (3,)
        assert np.linalg.norm(state[f"{name}_quat"]) == pytest.approx(1.0, abs=1e-6)
        low, high = state[f"{name}_bbox"]
        assert np.all(low < high)
        # the box is around the object: its body origin lies in it (the basket's, 5 mm under its base), and
        # after settling it rests on the floor
        assert np.all(low - 0.01 <= state[f"{name}_pos"]) and np.all(state[f"{name}_pos"] <= high + 0.01)
        assert low[2] == pytest.approx(0.0, abs=0.01)
    # the hand points down after the settle steps (robosuite's x y z w: ~180 degrees about x)
    assert abs(state["robot0_eef_quat"][0]) > 0.99


def test_state_follows_the_arm(env):
    before = env.reset(0).state
    after = env.step(np.array([1.0, 0, 0, 0, 0, 0, -1.0])).obs.state  # +x at full speed
    assert after["robot0_eef_pos"][0] > before["robot0_eef_pos"][0] + 0.002
    assert np.allclose(after["milk_1_pos"], before["milk_1_pos"], atol=1e-3)  # nothing else moved
