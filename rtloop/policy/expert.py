"""A scripted expert for libero_object: "pick up the <object> and place it in the basket", solved from
privileged sim state (rtloop.sim.libero_env documents Observation.state), no images.

It speaks the same action interface as OpenVLA: LIBERO's OSC_POSE controller in delta mode, a 7-vector of
normalised deltas in [-1, 1] (robosuite 1.4.0's controllers/config/osc_pose.json scales 1.0 to 0.05 m of
position and 0.5 rad of axis-angle rotation, world frame) and the gripper in LIBERO's convention
(-1 open, +1 close).

Every call derives what to do from the CURRENT state, not from a schedule: is the object held? above the
basket? is the hand at the grasp pose? Each motion is a proportional command toward the current target,
scaled down as a whole when it saturates. So an action the runtime applies several ticks in a row (async
mode with latency) moves the arm a little past its target and the next fresh action brings it back; an
object that slips or a grasp that misses simply sends the arm back to an earlier stage. The only memory is
the previous gripper opening (is the grip still tightening?), whether the grip was already established,
whether a missed grasp is reopening and whether a release has begun (the fingers take a few steps to let go).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from rtloop.clock import now
from rtloop.errors import InputError
from rtloop.policy.base import PolicyOutput
from rtloop.sim.base import Observation

LABEL = "scripted expert (privileged state)"
SUPPORTED_SUITES = ("libero_object",)

# robosuite 1.4.0 OSC_POSE output_max: action 1.0 = 5 cm of position goal, 0.5 rad of rotation goal.
POSITION_SCALE = 0.05
ROTATION_SCALE = 0.5

_INSTRUCTION = re.compile(r"^\s*pick up the (?P<object>[a-z][a-z ]*?) and place it in the basket\s*$", re.IGNORECASE)
BASKET = "basket"

# Gains: action units per action unit of error; 1.0 asks for the whole error as the next step's goal. The
# OSC covers about a third of a step's goal per step, so the error shrinks ~30% per step and the saturation
# caps the speed at ~1.2 cm per step. Higher gains converge sooner at zero latency but oscillate once
# actions are held: measured on libero_object task 0, gain 2.0 failed with an action every 2 ticks
# (100 ms), 1.0 succeeded at 2 ticks and failed at 4, 0.6 just made 4 ticks in 276 of 280 steps.
POSITION_GAIN = 1.0
ROTATION_GAIN = 1.0

GRIPPER_OPEN = -1.0
GRIPPER_CLOSE = 1.0
OPEN_GAP = 0.07  # finger gap (m) counted as open; fully open is ~0.078
EMPTY_GAP = 0.006  # closed on nothing: every libero_object item is wider than 2.5 cm
GRIP_SETTLED = 0.0008  # the gap moved less than this since the last observation: the grip has settled

HOVER_MARGIN = 0.05  # above the tallest object in the scene while travelling to the target
FINGER_CLEARANCE = 0.01  # the grip site stays this far above the object's bottom (fingertips ~6 mm lower)
GRASP_DEPTH = 0.035  # the grip site goes this far below the object's top, when the object is tall enough
RIM_CLEARANCE = 0.03  # the held object's bottom clears the basket rim by this while carrying
RELEASE_DEPTH = 0.0  # release with the object's bottom this far above the rim (negative: inside)
XY_TOLERANCE = 0.01
NEAR = 0.03  # closer than this (xy) to the object, the hand stops travelling at hover height
ABOVE_MARGIN = 0.02  # the grip site this far above the object's top: fingertips just clear it
Z_TOLERANCE = 0.01
BASKET_TOLERANCE = 0.015
YAW_TOLERANCE = 0.15
SQUARE_FOOTPRINT = 1.2  # long/short side ratio below which the grasp yaw does not matter


def check_suite(suite: str) -> None:
    """A one-line InputError for a suite the expert cannot solve (the CLI checks before building the env)."""
    if suite not in SUPPORTED_SUITES:
        raise InputError(
            f"the {LABEL} solves {', '.join(SUPPORTED_SUITES)} only (pick-and-place into the basket), "
            f"not {suite!r}"
        )


def parse_instruction(instruction: str) -> str:
    """The object a libero_object instruction names, as a BDDL category ("alphabet_soup")."""
    match = _INSTRUCTION.match(instruction)
    if match is None:
        raise InputError(
            f"the {LABEL} cannot parse the instruction {instruction!r}: it solves libero_object only, whose "
            "instructions read 'pick up the <object> and place it in the basket'"
        )
    return "_".join(match["object"].lower().split())


def _instance(category: str, state: dict[str, np.ndarray]) -> str:
    """The scene's instance of a BDDL category: "alphabet_soup" -> "alphabet_soup_1"."""
    names = sorted(k[: -len("_bbox")] for k in state if k.endswith("_bbox"))
    matches = [n for n in names if re.fullmatch(rf"{re.escape(category)}_\d+", n)]
    if not matches:
        raise InputError(
            f"the {LABEL} finds no {category!r} in the scene (objects: {', '.join(names) or 'none'})"
            + ("; it needs privileged state: use the real LIBERO env, not a replay" if not names else "")
        )
    return matches[0]


def quat_to_matrix(q: np.ndarray) -> np.ndarray:
    """x y z w (robosuite's order) -> 3x3 rotation matrix."""
    x, y, z, w = q / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def rotation_vector(r: np.ndarray) -> np.ndarray:
    """Axis-angle vector (axis * angle, radians) of a rotation matrix."""
    cos = np.clip((np.trace(r) - 1) / 2, -1.0, 1.0)
    angle = np.arccos(cos)
    if angle < 1e-6:
        return np.zeros(3)
    if np.pi - angle < 1e-3:  # near 180 degrees the skew part vanishes; r = 2 a a^T - I gives the axis a
        i = int(np.argmax(np.diag(r)))
        a_i = np.sqrt(max((r[i, i] + 1) / 2, 0.0))
        axis = r[:, i] / (2 * a_i)
        axis[i] = a_i
        return axis / np.linalg.norm(axis) * angle
    skew = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]])
    return skew / (2 * np.sin(angle)) * angle


def _saturate(command: np.ndarray) -> np.ndarray:
    """Scale the whole vector into [-1, 1] so a saturated move keeps its direction."""
    peak = np.max(np.abs(command))
    return command / peak if peak > 1.0 else command


@dataclass
class _Scene:
    eef: np.ndarray
    hand: np.ndarray  # hand rotation matrix; its y axis is the direction the fingers close along
    gap: float
    low: np.ndarray  # target object's bbox
    high: np.ndarray
    basket_low: np.ndarray
    basket_high: np.ndarray
    tallest: float

    @property
    def center(self) -> np.ndarray:
        return (self.low + self.high) / 2

    @property
    def basket_center(self) -> np.ndarray:
        return (self.basket_low + self.basket_high) / 2


class ScriptedExpert:
    label = LABEL
    needs_images = False

    def __init__(self) -> None:
        self._instruction: str | None = None
        self._category = ""
        self._previous_gap: float | None = None
        self._reopening = False
        self._releasing = False
        self._held = False
        self.stage = ""  # the last decision, for tests and debugging

    def warmup(self, obs: Observation, instruction: str) -> None:
        pass

    def close(self) -> None:
        pass

    def act(self, obs: Observation, instruction: str) -> PolicyOutput:
        start = now()
        if instruction != self._instruction:
            self._category = parse_instruction(instruction)
            self._instruction = instruction
        scene = self._scene(obs.state)
        position, rotation, gripper = self._decide(scene)
        self._previous_gap = scene.gap
        action = np.concatenate([position, rotation, [gripper]]).astype(np.float64)
        return PolicyOutput(action=action, raw_action=action.copy(), timings={"plan": now() - start})

    def _scene(self, state: dict[str, np.ndarray]) -> _Scene:
        target = _instance(self._category, state)
        basket = _instance(BASKET, state)
        tallest = max(v[1, 2] for k, v in state.items() if k.endswith("_bbox") and k != f"{basket}_bbox")
        qpos = state["robot0_gripper_qpos"]
        return _Scene(
            eef=state["robot0_eef_pos"],
            hand=quat_to_matrix(state["robot0_eef_quat"]),
            gap=float(qpos[0] - qpos[1]),
            low=state[f"{target}_bbox"][0],
            high=state[f"{target}_bbox"][1],
            basket_low=state[f"{basket}_bbox"][0],
            basket_high=state[f"{basket}_bbox"][1],
            tallest=float(tallest),
        )

    def _decide(self, s: _Scene) -> tuple[np.ndarray, np.ndarray, float]:
        rim = s.basket_high[2]
        if self._holding(s):
            # Carry: the object (not the hand) goes over the basket's centre, its bottom above the rim.
            offset = s.eef[:2] - s.center[:2]
            over = np.linalg.norm(s.center[:2] - s.basket_center[:2])
            clear_z = s.eef[2] + (rim + RIM_CLEARANCE - s.low[2])
            if self._releasing or over < BASKET_TOLERANCE:
                release_z = s.eef[2] + (rim + RELEASE_DEPTH - s.low[2])
                if self._releasing or s.low[2] <= rim + RELEASE_DEPTH + Z_TOLERANCE:
                    # The fingers take a few steps to let go; keep opening even if the arm drifts meanwhile.
                    self._releasing = True
                    self.stage = "release"
                    return self._move(s, s.eef), self._level(s), GRIPPER_OPEN
                self.stage = "lower"
                return self._move(s, np.array([*s.basket_center[:2] + offset, release_z])), \
                    self._level(s), GRIPPER_CLOSE
            if s.low[2] < rim + RIM_CLEARANCE - Z_TOLERANCE:
                self.stage = "lift"
                return self._move(s, np.array([*s.eef[:2], clear_z])), self._level(s), GRIPPER_CLOSE
            self.stage = "carry"
            return self._move(s, np.array([*s.basket_center[:2] + offset, clear_z])), \
                self._level(s), GRIPPER_CLOSE

        self._releasing = False
        if self._in_basket(s):
            self.stage = "done"  # let go and back off upward, clear of the object
            return self._move(s, np.array([*s.eef[:2], rim + 0.1])), self._level(s), GRIPPER_OPEN

        # Reach: above the object at a height clear of the whole scene, fingers aligned and open, then down.
        closing = self._grasp_axis(s)
        grasp_z = max(s.low[2] + FINGER_CLEARANCE, s.high[2] - GRASP_DEPTH)
        hover_z = max(s.tallest, s.high[2]) + HOVER_MARGIN
        xy_error = np.linalg.norm(s.center[:2] - s.eef[:2])
        yaw_error = self._yaw_error(s, closing)
        # Once the fingers are closing, a nudged object or hand does not abort the grasp.
        slack = 2.0 if s.gap < OPEN_GAP else 1.0
        at_grasp = xy_error < slack * XY_TOLERANCE and abs(s.eef[2] - grasp_z) < slack * Z_TOLERANCE
        if self._reopening and s.gap >= OPEN_GAP:
            self._reopening = False
        if at_grasp and not self._reopening:
            if s.gap < EMPTY_GAP:  # closed on nothing: open and try again
                self._reopening = True
            else:
                self.stage = "grasp"
                return self._move(s, np.array([*s.center[:2], grasp_z])), \
                    self._level(s, closing), GRIPPER_CLOSE
        # Down only once centred, aligned and open; off centre, hold the height (or rise to just above the
        # object) while the hand centres, so it never presses down on the object's top while sliding.
        above_z = s.high[2] + ABOVE_MARGIN
        if xy_error < XY_TOLERANCE and yaw_error < YAW_TOLERANCE and s.gap >= OPEN_GAP:
            self.stage = "descend"
            z = grasp_z
        elif xy_error < NEAR:
            self.stage = "centre"
            z = max(above_z, s.eef[2]) if s.eef[2] >= s.high[2] else s.eef[2]
        else:
            self.stage = "approach"
            z = hover_z
        return self._move(s, np.array([*s.center[:2], z])), self._level(s, closing), GRIPPER_OPEN

    def _holding(self, s: _Scene) -> bool:
        """Fingers closed on the target: the object moves with the hand. A grip counts once it has stopped
        tightening, and then for as long as the object stays between the fingers (a wobble of the fingers
        mid-carry must not read as a release)."""
        between = (
            np.linalg.norm(s.center[:2] - s.eef[:2]) < 0.03
            and s.low[2] - Z_TOLERANCE < s.eef[2] < s.high[2] + Z_TOLERANCE
            and EMPTY_GAP <= s.gap < OPEN_GAP
        )
        settled = self._previous_gap is not None and abs(s.gap - self._previous_gap) < GRIP_SETTLED
        self._held = between and (self._held or settled)
        return self._held

    def _in_basket(self, s: _Scene) -> bool:
        inside = np.all(s.center[:2] > s.basket_low[:2]) and np.all(s.center[:2] < s.basket_high[:2])
        return bool(inside and s.low[2] < s.basket_high[2] + RIM_CLEARANCE + HOVER_MARGIN)

    @staticmethod
    def _move(s: _Scene, target: np.ndarray) -> np.ndarray:
        return _saturate(POSITION_GAIN * (target - s.eef) / POSITION_SCALE)

    @staticmethod
    def _grasp_axis(s: _Scene) -> np.ndarray | None:
        """The horizontal direction to close the fingers along (the footprint's short side), or None when
        the footprint is near square and any yaw grips it."""
        size = s.high[:2] - s.low[:2]
        if max(size) < SQUARE_FOOTPRINT * min(size):
            return None
        return np.array([1.0, 0.0, 0.0]) if size[0] < size[1] else np.array([0.0, 1.0, 0.0])

    @staticmethod
    def _yaw_error(s: _Scene, closing: np.ndarray | None) -> float:
        if closing is None:
            return 0.0
        finger = s.hand[:, 1].copy()
        finger[2] = 0.0
        finger /= np.linalg.norm(finger)
        return float(np.arccos(min(1.0, abs(finger @ closing))))  # either finger direction will do

    @staticmethod
    def _level(s: _Scene, closing: np.ndarray | None = None) -> np.ndarray:
        """Rotation command: the hand pointing straight down, its fingers closing along `closing` (or
        along their current horizontal direction)."""
        finger = s.hand[:, 1].copy()
        finger[2] = 0.0
        finger /= np.linalg.norm(finger)
        if closing is not None:
            finger = closing if finger @ closing >= 0 else -closing
        down = np.array([0.0, 0.0, -1.0])
        target = np.column_stack([np.cross(finger, down), finger, down])
        return _saturate(ROTATION_GAIN * rotation_vector(target @ s.hand.T) / ROTATION_SCALE)
