import logging

import numpy as np
import pytest

from rtloop.policy.guards import CONSTANT_ACTION_RUN, Guards
from rtloop.policy.processor import build_prompt

LIBERO_STATS = {"action": {"q01": [-0.75, -0.86, -0.94, -0.11, -0.17, -0.19, 0.0],
                           "q99": [0.94, 0.87, 0.94, 0.13, 0.18, 0.29, 1.0]}}
BRIDGE_STATS = {"action": {"q01": [-0.029, -0.042, -0.026, -0.081, -0.092, -0.16, 0.0],
                           "q99": [0.028, 0.041, 0.040, 0.082, 0.078, 0.16, 1.0]}}


def scene(seed: int) -> np.ndarray:
    """A textured 224x224 frame with a bright square whose position depends on seed (a moving object)."""
    rng = np.random.default_rng(100)
    img = rng.integers(40, 200, (224, 224, 3), dtype=np.uint8)
    y, x = 20 + 7 * seed % 150, 30 + 11 * seed % 150
    img[y:y + 40, x:x + 40] = 250
    return img


def kinds(guards: Guards) -> list[str]:
    return [a.kind for a in guards.drain()]


def test_black_frame_warns_once_and_loudly(caplog):
    g = Guards()
    with caplog.at_level(logging.WARNING, logger="rtloop"):
        g.check_frame(np.zeros((224, 224, 3), np.uint8))
        g.check_frame(np.zeros((224, 224, 3), np.uint8))
    alerts = g.drain()
    assert [a.kind for a in alerts] == ["blank_frame"] and "all-black" in alerts[0].message
    assert [r.getMessage().startswith("SILENT FAILURE? ") for r in caplog.records] == [True]
    assert g.drain() == []


def test_constant_grey_frame_warns():
    g = Guards()
    g.check_frame(np.full((224, 224, 3), 120, np.uint8))
    assert kinds(g) == ["blank_frame"]


def test_good_frame_is_silent():
    g = Guards()
    g.check_frame(scene(0))
    assert kinds(g) == []


def test_prompt_checks():
    g = Guards()
    g.check_prompt(build_prompt("pick up the bowl"))
    assert kinds(g) == []
    g.check_prompt("What should the robot do to pick up the bowl?")
    assert kinds(g) == ["prompt"]
    for bad in ("pick up the bowl?", build_prompt("pick up the bowl")):  # trailing "?", whole prompt nested
        g = Guards()
        g.check_prompt(build_prompt(bad))
        assert kinds(g) == ["prompt"], bad


def test_bridge_statistics_in_libero():
    g = Guards()
    g.check_unnorm_key("bridge_orig", BRIDGE_STATS, "libero_object")
    alerts = g.drain()
    assert [a.kind for a in alerts] == ["unnorm_key"] and "bridge_orig" in alerts[0].message
    assert "another robot" in alerts[0].message


def test_other_suite_key():
    g = Guards()
    g.check_unnorm_key("libero_spatial_no_noops", LIBERO_STATS, "libero_object")
    assert kinds(g) == ["unnorm_key"]


@pytest.mark.parametrize("key, stats, suite", [
    ("libero_object", LIBERO_STATS, "libero_object"),
    ("libero_object_no_noops", LIBERO_STATS, "libero_object"),
    ("bridge_orig", BRIDGE_STATS, None),  # not running LIBERO: nothing to compare with
])
def test_matching_key_is_silent(key, stats, suite):
    g = Guards()
    g.check_unnorm_key(key, stats, suite)
    assert kinds(g) == []


def _step(g, frame, action):
    g.check_frame(frame)
    g.check_action(action)


def test_same_action_for_differing_frames():
    g = Guards()
    action = np.array([0.1, 0.0, -0.2, 0.0, 0.0, 0.0, 1.0])
    for i in range(CONSTANT_ACTION_RUN - 1):
        _step(g, scene(i), action)
    assert kinds(g) == []  # one short of the run length
    _step(g, scene(CONSTANT_ACTION_RUN), action)
    alerts = g.drain()
    assert [a.kind for a in alerts] == ["constant_action"] and "openvla#346" in alerts[0].message
    for i in range(30):
        _step(g, scene(i), action)
    assert kinds(g) == []  # once


def test_same_action_for_same_frame_is_silent():
    g = Guards()
    action = np.zeros(7)
    for _ in range(3 * CONSTANT_ACTION_RUN):
        _step(g, scene(0), action)
    assert kinds(g) == []


def test_changing_actions_reset_the_run():
    g = Guards()
    for i in range(3 * CONSTANT_ACTION_RUN):
        action = np.full(7, 0.1 * (i // (CONSTANT_ACTION_RUN - 1)))  # a new action every 9 frames
        _step(g, scene(i), action)
    assert kinds(g) == []


def test_rotation_switched_off():
    g = Guards()
    g.check_rotation(True)
    assert kinds(g) == []
    g.check_rotation(False)
    assert kinds(g) == ["image_orientation"]
