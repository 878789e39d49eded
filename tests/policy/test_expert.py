"""The scripted expert (privileged state): its own logic on hand-made states, then real LIBERO episodes."""

import numpy as np
import pytest

from rtloop.errors import InputError
from rtloop.policy.expert import (
    LABEL,
    POSITION_GAIN,
    POSITION_SCALE,
    ScriptedExpert,
    check_suite,
    parse_instruction,
    quat_to_matrix,
    rotation_vector,
)
from rtloop.sim.base import Observation

INSTRUCTION = "pick up the alphabet soup and place it in the basket"
DOWN = np.array([1.0, 0.0, 0.0, 0.0])  # x y z w: 180 degrees about x, the hand pointing down


def scene(eef, gap=0.078, soup_low=(-0.15, -0.27, 0.0), soup_size=(0.062, 0.062, 0.076), quat=DOWN):
    low = np.array(soup_low)
    basket_low = np.array([-0.06, 0.17, 0.0])
    return {
        "robot0_eef_pos": np.array(eef, dtype=float),
        "robot0_eef_quat": np.array(quat, dtype=float),
        "robot0_gripper_qpos": np.array([gap / 2, -gap / 2]),
        "alphabet_soup_1_pos": low + np.array(soup_size) / 2,
        "alphabet_soup_1_quat": np.array([0.0, 0.0, 0.0, 1.0]),
        "alphabet_soup_1_bbox": np.stack([low, low + np.array(soup_size)]),
        "basket_1_pos": basket_low + 0.07,
        "basket_1_quat": np.array([0.0, 0.0, 0.0, 1.0]),
        "basket_1_bbox": np.stack([basket_low, basket_low + np.array([0.15, 0.17, 0.14])]),
    }


def test_identity_and_interface():
    expert = ScriptedExpert()
    assert expert.label == LABEL == "scripted expert (privileged state)"
    assert expert.needs_images is False


def test_instruction_names_the_object():
    assert parse_instruction(INSTRUCTION) == "alphabet_soup"
    assert parse_instruction("Pick up the BBQ sauce and place it in the basket") == "bbq_sauce"


@pytest.mark.parametrize("instruction", [
    "put the bowl on the plate",  # libero_goal
    "pick up the black bowl between the plate and the ramekin and place it on the plate",  # libero_spatial
    "put both the alphabet soup and the tomato sauce in the basket",  # libero_10
    "",
])
def test_other_instructions_are_refused_in_one_line(instruction):
    with pytest.raises(InputError, match="libero_object only") as info:
        ScriptedExpert().act(Observation(None, scene([0, 0, 0.25])), instruction)
    assert "\n" not in str(info.value)


def test_only_libero_object_is_supported():
    check_suite("libero_object")
    with pytest.raises(InputError, match="libero_object only.*'libero_spatial'"):
        check_suite("libero_spatial")


def test_no_privileged_state_is_an_input_error():
    with pytest.raises(InputError, match="needs privileged state"):
        ScriptedExpert().act(Observation(np.zeros((8, 8, 3), np.uint8)), INSTRUCTION)


def test_object_missing_from_the_scene():
    state = {k.replace("alphabet_soup", "ketchup"): v for k, v in scene([0, 0, 0.25]).items()}
    with pytest.raises(InputError, match="no 'alphabet_soup' in the scene.*ketchup_1"):
        ScriptedExpert().act(Observation(None, state), INSTRUCTION)


def test_rotation_helpers_agree():
    angle = 0.7
    axis = np.array([0.0, 0.6, 0.8])
    q = np.array([*(axis * np.sin(angle / 2)), np.cos(angle / 2)])
    assert np.allclose(rotation_vector(quat_to_matrix(q)), axis * angle)
    assert np.allclose(rotation_vector(quat_to_matrix(DOWN)), [np.pi, 0, 0])
    half_turn = quat_to_matrix(np.array([*axis, 0.0]))  # 180 degrees about `axis`
    assert np.allclose(rotation_vector(half_turn), axis * np.pi)


def test_far_from_the_object_it_travels_open_and_saturated():
    out = ScriptedExpert().act(Observation(None, scene([0.1, 0.1, 0.25])), INSTRUCTION)
    assert out.action.shape == (7,) and np.array_equal(out.action, out.raw_action)
    assert np.all(np.abs(out.action[:6]) <= 1.0) and np.max(np.abs(out.action[:3])) == pytest.approx(1.0)
    assert out.action[6] == -1.0  # LIBERO: -1 opens
    direction = out.action[:2] / np.linalg.norm(out.action[:2])
    soup_xy = np.array([-0.15 + 0.031, -0.27 + 0.031])
    assert np.allclose(direction, (soup_xy - [0.1, 0.1]) / np.linalg.norm(soup_xy - [0.1, 0.1]), atol=1e-6)
    assert set(out.timings) == {"plan"} and out.timings["plan"] >= 0


def test_command_is_proportional_near_the_target():
    """Close in, the position command is the error in action units times the gain, not a fixed step."""
    expert = ScriptedExpert()
    centred = scene([-0.119, -0.239, 0.06])  # over the soup, hand open, a little above the grasp height
    out = expert.act(Observation(None, centred), INSTRUCTION)
    assert expert.stage == "descend" and out.action[6] == -1.0
    assert -1.0 < out.action[2] < 0  # down, unsaturated
    grasp_z = 0.076 - 0.035
    assert out.action[2] == pytest.approx(POSITION_GAIN * (grasp_z - 0.06) / POSITION_SCALE)


def test_at_the_grasp_pose_it_closes_then_lifts_once_the_grip_settles():
    expert = ScriptedExpert()
    at_grasp = [-0.119, -0.239, 0.041]
    out = expert.act(Observation(None, scene(at_grasp)), INSTRUCTION)
    assert expert.stage == "grasp" and out.action[6] == 1.0
    expert.act(Observation(None, scene(at_grasp, gap=0.064)), INSTRUCTION)  # still closing
    assert expert.stage == "grasp"
    out = expert.act(Observation(None, scene(at_grasp, gap=0.0635)), INSTRUCTION)  # settled on the can
    assert expert.stage == "lift" and out.action[2] > 0 and out.action[6] == 1.0


def test_a_missed_grasp_reopens_before_trying_again():
    expert = ScriptedExpert()
    at_grasp = [-0.119, -0.239, 0.041]
    out = expert.act(Observation(None, scene(at_grasp, gap=0.002)), INSTRUCTION)  # closed on nothing
    assert out.action[6] == -1.0
    out = expert.act(Observation(None, scene(at_grasp, gap=0.03)), INSTRUCTION)  # opening: not yet closing
    assert out.action[6] == -1.0
    out = expert.act(Observation(None, scene(at_grasp, gap=0.078)), INSTRUCTION)
    assert expert.stage == "grasp" and out.action[6] == 1.0


def test_held_object_over_the_basket_is_released_and_the_release_is_kept():
    expert = ScriptedExpert()
    # The can held 3 cm above the basket rim (0.14), centred over the basket (0.015, 0.255).
    held = dict(eef=[0.015, 0.255, 0.21], gap=0.0635, soup_low=(-0.016, 0.224, 0.17))
    expert.act(Observation(None, scene(**held)), INSTRUCTION)
    out = expert.act(Observation(None, scene(**held)), INSTRUCTION)
    assert expert.stage == "lower" and out.action[2] < 0 and out.action[6] == 1.0
    held.update(eef=[0.015, 0.255, 0.185], soup_low=(-0.016, 0.224, 0.145))
    out = expert.act(Observation(None, scene(**held)), INSTRUCTION)
    assert expert.stage == "release" and out.action[6] == -1.0
    held.update(eef=[0.015, 0.255, 0.2], soup_low=(-0.016, 0.224, 0.16))  # the arm drifted up meanwhile
    out = expert.act(Observation(None, scene(**held)), INSTRUCTION)
    assert expert.stage == "release" and out.action[6] == -1.0


@pytest.mark.slow
def test_expert_solves_real_libero_through_the_runtime():
    """Two tasks (a can and a flat box), one init state each, zero latency (sync), no rendering. On the
    virtual clock: the sim waits for every action either way, and the wall clock's 20 Hz pacing spent
    most of the test asleep."""
    import anyio

    from rtloop.clock import VirtualClock
    from rtloop.runtime.latency import FixedLatency
    from rtloop.runtime.loop import LoopConfig, Runtime
    from rtloop.runtime.records import Fanout
    from rtloop.runtime.summary import RecordLog
    from rtloop.runtime.worker import WorkerThread
    from rtloop.sim import make_env

    for task in (0, 1):  # alphabet soup, cream cheese
        sim_thread, policy_thread = WorkerThread("sim"), WorkerThread("policy")
        env = sim_thread.call(lambda: make_env(suite="libero_object", task_id=task, render=False))
        try:
            log = RecordLog()
            runtime = Runtime(env, ScriptedExpert(), sim_thread, policy_thread, Fanout([log]),
                              LoopConfig(rate=20, sync=True), clock=VirtualClock(), latency=FixedLatency(0.0))

            async def one() -> object:
                return await runtime.run_episode(0)

            record = anyio.run(one)
        finally:
            sim_thread.call(env.close)
            sim_thread.close()
            policy_thread.close()
        assert record.error is None
        assert record.success, f"task {task}: the expert failed init state 0 in {record.steps} steps"
        assert record.steps < env.horizon
        ticks = [r for r in log.records if r["kind"] == "tick"]
        assert all(t["render_s"] == 0.0 for t in ticks) and all(t["action_source"] == "fresh" for t in ticks)
